//! Open files and their tables. One [`Shared`] core per file per process (a static registry, so
//! every thread and every Node worker shares it); each [`Database`] is a handle that owns the
//! locks it takes, and the file closes when its last handle closes.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use redb::{ReadableTableMetadata, TableError};

use crate::blocking;
use crate::cache::Lookup;
use crate::envelope::{self, Record};
use crate::error::{Error, Result};
use crate::file::commit_queue::{CommitJob, CommitQueue, GroupJob, GroupPart, Job};
use crate::file::shared::Shared;
use crate::file::storage::{
    normalize, open_error, open_guarded, DatabaseOptions, TableState, MAX_RECORD_BYTES,
};
use crate::keys::{validate_key, KeyFormat};
use crate::locks::{Acquire, Grant, GrantCallback, LockToken, OwnerId};
use crate::map::{
    Change, CommitCallback, CommitOptions, LockMode, LockedEntry, MapOptions, MapStats, NextKey,
};
use crate::range::{EntryRange, RangeOptions};
use crate::sequence::{NumberCallback, Take};
use crate::watch::{WatchOptions, Watcher};

static NEXT_OWNER: AtomicU64 = AtomicU64::new(1);
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
            return Err(crate::file::instance::read_only(&self.shared.path));
        }
        Ok(())
    }

    fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        // Commits already submitted by this handle land before its locks are let go.
        self.shared.barrier();
        self.shared.queue.watchers.close_owner(self.owner);
        for table in self.shared.tables() {
            table.locks.release_owner(self.owner);
        }
        let mut outcome = Ok(());
        crate::file::registry::close(&self.registered, &self.shared, || {
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
        let registration = crate::file::registry::open(&key, || Shared::open(&key, &options))?;
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
        let table = crate::error::guard_damage(&shared.path, || {
            shared.table(name, &options, self.handle.read_only)
        })?;
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
    /// closes the file if this was its last handle (idempotent). Says whether anything
    /// acknowledged was lost: when this was
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

    /// Takes the snapshot for a backup now; run the copy later, on any thread.
    pub fn begin_backup(
        &self,
        dest: impl AsRef<Path>,
    ) -> Result<crate::file::maintenance::FileBackup> {
        self.check_open()?;
        crate::file::maintenance::begin_backup(&self.handle.shared, dest.as_ref())
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
            .submit(Job::Barrier(Box::new(move || {
                done(crate::file::maintenance::compact(&file))
            })));
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
        crate::file::maintenance::tables(&self.handle.shared)
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
            crate::file::commit_queue::fail_job(Job::Many(jobs), &Error::StoreClosed);
            return None;
        }
        Some(jobs)
    }
}

impl Database {
    /// Checks a commit of several held locks, all written in one transaction or none (see
    /// [`crate::Database::prepare_group`]): every lock must be held, of a map of this file, and
    /// named once; otherwise InvalidArgument with every lock still held. A failure found now
    /// (the handle closed, an oversize record) comes back at once, the locks released unless
    /// `hold_lock_on_failure`.
    pub fn prepare_group(
        &self,
        items: Vec<(MapStore, String, LockToken, Change)>,
        options: CommitOptions,
        done: CommitCallback,
    ) -> Result<PreparedCommit> {
        check_group(
            items
                .iter()
                .map(|(map, key, token, change)| (map, key.as_str(), *token, change)),
            &self.handle.shared,
            options,
        )?;
        self.handle.check_writable()?;
        let refused = if self.is_closed() {
            Some(Error::StoreClosed)
        } else {
            items.iter().find_map(|(_, key, _, change)| match change {
                Change::Put(record) if record.len() > MAX_RECORD_BYTES => {
                    Some(Error::invalid(format!(
                        "the record for '{key}' is {} bytes; the limit is {MAX_RECORD_BYTES}",
                        record.len()
                    )))
                }
                _ => None,
            })
        };
        if let Some(err) = refused {
            if !options.hold_lock_on_failure {
                for (map, key, token, _) in &items {
                    let _ = map.table.locks.release(key, *token, false);
                }
            }
            return Err(err);
        }
        Ok(PreparedCommit(Job::Group(GroupJob {
            parts: items
                .into_iter()
                .map(|(map, key, token, change)| GroupPart {
                    table: map.table,
                    key: key.into(),
                    token,
                    change,
                })
                .collect(),
            release: !options.update_only,
            hold_on_failure: options.hold_lock_on_failure,
            durable: self.handle.durable,
            done,
        })))
    }

    /// Blocking: commits the changes of several [`EntryGuard`]s in one transaction, all or
    /// none, and updates each guard as its own commit would (see
    /// [`crate::Database::commit_guards`]).
    pub fn commit_guards(
        &self,
        items: Vec<(&mut EntryGuard, Change)>,
        options: CommitOptions,
    ) -> Result<()> {
        refuse_on_writer(&self.handle.shared.queue, "commit")?;
        if let Some((guard, _)) = items.iter().find(|(guard, _)| !guard.held) {
            return Err(Error::invalid(format!(
                "the lock on '{}' is not held (committed or released): nothing was written",
                guard.key
            )));
        }
        let written: Vec<Option<Arc<[u8]>>> =
            items.iter().map(|(_, change)| change.record()).collect();
        let (tx, rx) = mpsc::channel();
        let (guards, parts): (Vec<&mut EntryGuard>, Vec<_>) = items
            .into_iter()
            .map(|(guard, change)| {
                let part = (
                    guard.store.clone(),
                    guard.key.clone(),
                    guard.locked.token,
                    change,
                );
                (guard, part)
            })
            .unzip();
        let outcome = self
            .prepare_group(
                parts,
                options,
                Box::new(move |r| {
                    let _ = tx.send(r);
                }),
            )
            .and_then(|prepared| {
                self.handle.shared.queue.write_inline(vec![prepared.0]);
                rx.recv().map_err(|_| Error::StoreClosed)?
            });
        for (guard, record) in guards.into_iter().zip(written) {
            guard.held = match &outcome {
                Ok(()) => options.update_only,
                // Kept by a refusal or by `hold_lock_on_failure`, unless its handle closed.
                Err(_) => guard.store.holds(&guard.key, guard.locked.token),
            };
            if outcome.is_ok() {
                guard.locked.existed = record.is_some();
                guard.locked.record = record;
            }
        }
        outcome
    }
}

/// The checks of a multi-lock commit that keep every lock on failure: each lock held, of a map
/// of `shared`'s file, named once, and no delete with `update_only`.
fn check_group<'a>(
    items: impl Iterator<Item = (&'a MapStore, &'a str, LockToken, &'a Change)>,
    shared: &Arc<Shared>,
    options: CommitOptions,
) -> Result<()> {
    let mut seen = std::collections::HashSet::new();
    for (map, key, token, change) in items {
        if matches!(change, Change::Delete) && options.update_only {
            return Err(Error::invalid(
                "commit cannot both delete and keep the lock (delete with updateOnly): nothing was written",
            ));
        }
        if !Arc::ptr_eq(&map.handle.shared, shared) {
            return Err(Error::invalid(format!(
                "the lock on '{key}' belongs to a map of another store: one commit writes one \
                 store; nothing was written"
            )));
        }
        if !seen.insert((Arc::as_ptr(&map.table), key)) {
            return Err(Error::invalid(format!(
                "the lock on '{key}' of map '{}' is named twice in one commit: nothing was \
                 written",
                map.table.name
            )));
        }
        if !map.table.locks.holds(key, token) {
            return Err(Error::invalid(format!(
                "the lock on '{key}' of map '{}' is not held (committed or released): nothing \
                 was written",
                map.table.name
            )));
        }
    }
    Ok(())
}

/// A commit that passed its checks and waits to be queued (see [`MapStore::prepare_commit`]).
pub struct PreparedCommit(Job);

/// Runs redb's integrity check over a file that is not open: true when it is clean, false when
/// redb had to repair it; a damaged file it cannot repair is [`Error::DatabaseCorrupt`].
pub fn check_integrity(path: impl AsRef<Path>) -> Result<bool> {
    let key = normalize(path.as_ref())?;
    let shown = key.display().to_string();
    if crate::file::registry::is_open(&key) {
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
            Err(Error::StoreClosed) if !shared.is_released() => read(),
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
            cache_bytes: cache.bytes,
            locks_held: locks.held,
            locks_waiting: locks.waiting,
            commits: commits.commits.load(Ordering::Relaxed),
            batches: commits.batches.load(Ordering::Relaxed),
            failed_batches: commits.failed_batches.load(Ordering::Relaxed),
            largest_batch: commits.largest_batch.load(Ordering::Relaxed),
            unsynced_batches: commits.unsynced_batches.load(Ordering::Relaxed),
            replica_revision: None,
            replica_lag: None,
            watchers: shared.queue.watchers.count(&self.table.name) as u64,
        })
    }

    // ---- watches ----

    /// Starts a watch of this map's commits from now on, from every handle and thread of the
    /// process, in commit order (see [`crate::MapStore::watch`]). Closing this handle ends it.
    pub fn watch(&self, options: &WatchOptions) -> Result<Watcher> {
        self.check_open()?;
        let watcher = self.shared().queue.watchers.watch(
            &self.table.name,
            self.handle.owner,
            options,
            || i64::MIN,
        )?;
        // A close that ran meanwhile may have ended this handle's watches before this one.
        self.check_open()?;
        Ok(watcher)
    }

    // ---- the blocking API for Rust callers ----

    /// Waits for `key`'s lock (up to `timeout`) and returns the entry locked per `mode`.
    pub fn lock(&self, key: &str, mode: LockMode, timeout: Option<Duration>) -> Result<EntryGuard> {
        Ok(EntryGuard {
            store: self.clone(),
            key: key.to_string(),
            locked: blocking::lock(self, key, mode, timeout)?,
            held: true,
        })
    }

    /// The next auto key, waiting for a lease if needed.
    pub fn next_key_blocking(&self) -> Result<String> {
        blocking::next_key(self)
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

impl blocking::Waits for MapStore {
    fn acquire(
        &self,
        key: &str,
        ticket: u64,
        make_waiter: impl FnOnce() -> Result<GrantCallback>,
    ) -> Result<Acquire> {
        MapStore::acquire(self, key, ticket, make_waiter)
    }

    fn cancel_wait(&self, ticket: u64, reason: Error) -> bool {
        MapStore::cancel_wait(self, ticket, reason)
    }

    fn finish_acquire(&self, key: &str, grant: Grant, mode: LockMode) -> Result<LockedEntry> {
        MapStore::finish_acquire(self, key, grant, mode)
    }

    fn next_key(
        &self,
        make_waiter: impl FnOnce() -> Box<dyn FnOnce(Result<String>) + Send>,
    ) -> Result<NextKey> {
        MapStore::next_key(self, make_waiter)
    }

    fn check_may_wait(&self, what: &str) -> Result<()> {
        refuse_on_writer(&self.shared().queue, what)
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
        let written = change.record();
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
    use crate::file::storage::Backend;

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

    /// A plain file whose next read fails with EIO once `fail_next_read` is set.
    #[derive(Debug)]
    struct FailingRead {
        file: redb::backends::FileBackend,
        fail_next_read: Arc<AtomicBool>,
    }

    impl redb::StorageBackend for FailingRead {
        fn len(&self) -> std::io::Result<u64> {
            self.file.len()
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
            if self.fail_next_read.swap(false, Ordering::SeqCst) {
                return Err(std::io::Error::from_raw_os_error(5));
            }
            self.file.read(offset, out)
        }
        fn set_len(&self, len: u64) -> std::io::Result<()> {
            self.file.set_len(len)
        }
        fn sync_data(&self) -> std::io::Result<()> {
            self.file.sync_data()
        }
        fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
            self.file.write(offset, data)
        }
    }

    /// A read of another thread fails, and redb refuses all I/O from then on, but the reader
    /// has not yet told the writer (it marks the failure only once redb has returned): a commit
    /// reaching the writer in that moment was failed with "an earlier write to the file failed"
    /// (issue 14.12's recovery test, now and then under load). The writer reopens the file and
    /// commits it.
    #[test]
    fn a_commit_right_after_another_threads_failed_read_goes_through() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.redb");
        {
            let db = Database::open(&path, DatabaseOptions::default()).unwrap();
            let map = db.map_store("m", MapOptions::default()).unwrap();
            for i in 0..2_000 {
                let guard = map.lock(&format!("k{i:04}"), LockMode::New, None).unwrap();
                guard.commit(envelope::encode(&[], &[7u8; 100])).unwrap();
            }
            db.try_close().unwrap();
        }
        let fail_next_read = Arc::new(AtomicBool::new(false));
        let armed = fail_next_read.clone();
        let options = DatabaseOptions {
            // No page of the file in redb's cache: the read below goes to the backend.
            page_cache_bytes: 0,
            backend: Some(Backend(Arc::new(move |location: &Path| {
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(location)?;
                Ok(Box::new(FailingRead {
                    file: redb::backends::FileBackend::new(file)
                        .map_err(|e| std::io::Error::other(e.to_string()))?,
                    fail_next_read: armed.clone(),
                }) as Box<dyn redb::StorageBackend>)
            }))),
            ..Default::default()
        };
        let db = Database::open(&path, options).unwrap();
        let map = db.map_store("m", MapOptions::default()).unwrap();
        // Locked first: taking the lock reads the file, which would see the failure itself.
        let guard = map.lock("after", LockMode::New, None).unwrap();
        // The reader's failed read, straight on the instance: nothing marks the failure.
        fail_next_read.store(true, Ordering::SeqCst);
        let instance = map.shared().file.db().unwrap();
        let failed = (|| -> std::result::Result<(), redb::Error> {
            let txn = instance.begin_read()?;
            let table = txn.open_table(redb::TableDefinition::<&str, &[u8]>::new(
                &map.table.redb_name,
            ))?;
            table.get("k1999")?;
            Ok(())
        })();
        assert!(failed.is_err(), "the read failed: {failed:?}");
        drop(instance);
        guard
            .commit(envelope::encode(&[], b"v"))
            .expect("committed after a reopen");
        assert_eq!(map.get_record("after").unwrap().unwrap().value, b"v");
        assert_eq!(map.get_record("k1999").unwrap().unwrap().value, [7u8; 100]);
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
