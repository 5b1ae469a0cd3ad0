//! The store callers use, whatever holds its bytes: a redb file ([`crate::file`], one process)
//! or an etcd cluster ([`crate::etcd`], many processes and hosts). Each call goes to the storage
//! the database was opened on; nothing above this module knows which one it is.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::envelope::Record;
use crate::error::{Error, Result};
#[cfg(feature = "etcd")]
use crate::etcd::{ClusterCommit, ClusterDatabase, ClusterGuard, ClusterMap, ClusterOptions};
use crate::file::maintenance::FileBackup;
#[cfg(feature = "etcd")]
use crate::file::maintenance::{check_backup_dest, write_store, MapContents};
use crate::file::storage::DatabaseOptions;
use crate::file::store as file;
use crate::locks::{Acquire, Grant, GrantCallback, LockToken};
use crate::map::{
    Change, CommitCallback, CommitOptions, LockMode, LockedEntry, MapOptions, MapStats, NextKey,
};
use crate::range::{EntryRange, RangeOptions};
use crate::watch::{WatchOptions, Watcher};

// Several held locks, one atomic commit: `Database::prepare_group` and friends.
#[path = "multi_commit.rs"]
mod multi_commit;
pub use multi_commit::CommitItem;

/// Calls `$call` on whichever storage `$self` holds.
macro_rules! each {
    ($value:expr, $name:ident => $call:expr) => {
        match $value {
            Storage::File($name) => $call,
            #[cfg(feature = "etcd")]
            Storage::Cluster($name) => $call,
            #[cfg(not(feature = "etcd"))]
            Storage::Never(never, _) => absurd(never),
        }
    };
}

/// The arm of a storage this build does not have.
#[cfg(not(feature = "etcd"))]
fn absurd(never: impl std::borrow::Borrow<std::convert::Infallible>) -> ! {
    match *never.borrow() {}
}

#[derive(Clone)]
enum Storage<F, C> {
    File(F),
    #[cfg(feature = "etcd")]
    Cluster(C),
    #[cfg(not(feature = "etcd"))]
    #[allow(dead_code)]
    Never(std::convert::Infallible, std::marker::PhantomData<C>),
}

#[cfg(not(feature = "etcd"))]
type ClusterDatabase = ();
#[cfg(not(feature = "etcd"))]
type ClusterMap = ();
#[cfg(not(feature = "etcd"))]
type ClusterCommit = ();
#[cfg(not(feature = "etcd"))]
type ClusterGuard = ();
#[cfg(not(feature = "etcd"))]
type ClusterBackup = ();

/// A handle on a store: a file, or a cluster and prefix. Cheap to clone; every clone is the
/// same handle.
#[derive(Clone)]
pub struct Database(Storage<file::Database, ClusterDatabase>);

/// One named map of a [`Database`], through one handle.
#[derive(Clone)]
pub struct MapStore(Storage<file::MapStore, ClusterMap>);

/// A commit that passed its checks and waits to be queued (see [`MapStore::prepare_commit`]).
pub struct PreparedCommit(Storage<file::PreparedCommit, ClusterCommit>);

/// A held lock, for Rust callers (see [`MapStore::lock`]); dropping it releases the lock.
pub struct EntryGuard(Storage<file::EntryGuard, ClusterGuard>);

impl Database {
    /// Opens (creating if needed) the file, or joins the core already open in this process.
    pub fn open(path: impl AsRef<Path>, options: DatabaseOptions) -> Result<Database> {
        file::Database::open(path, options).map(|db| Database(Storage::File(db)))
    }

    /// Connects to an etcd cluster: `etcd://host:port[,host:port…]/prefix` (or `etcds://`).
    /// Handles of one process on the same cluster and prefix share one core.
    #[cfg(feature = "etcd")]
    pub fn open_cluster(url: &str, options: ClusterOptions) -> Result<Database> {
        ClusterDatabase::open(url, options).map(|db| Database(Storage::Cluster(db)))
    }

    /// Whether `location` names a cluster (`etcd://` or `etcds://`) rather than a file.
    /// Whether `location` names a cluster: it starts with `etcd:` or `etcds:` in any case (a
    /// mistyped URL is then refused as malformed, never taken for a file path; a file whose
    /// name starts so is written `./etcd:...`).
    pub fn is_cluster_url(location: &str) -> bool {
        let scheme = location
            .split_once(':')
            .map(|(s, _)| s.to_ascii_lowercase());
        matches!(scheme.as_deref(), Some("etcd" | "etcds"))
    }

    pub fn map_store(&self, name: &str, options: MapOptions) -> Result<MapStore> {
        Ok(MapStore(match &self.0 {
            Storage::File(db) => Storage::File(db.map_store(name, options)?),
            #[cfg(feature = "etcd")]
            Storage::Cluster(db) => Storage::Cluster(db.map_store(name, &options)?),
            #[cfg(not(feature = "etcd"))]
            Storage::Never(never, _) => absurd(never),
        }))
    }

    /// The file's path, or the cluster URL (without credentials).
    pub fn location(&self) -> String {
        match &self.0 {
            Storage::File(db) => db.path().display().to_string(),
            #[cfg(feature = "etcd")]
            Storage::Cluster(db) => db.url(),
            #[cfg(not(feature = "etcd"))]
            Storage::Never(never, _) => absurd(never),
        }
    }

    /// The file's path, for a file; `None` for a cluster.
    pub fn path(&self) -> Option<&Path> {
        match &self.0 {
            Storage::File(db) => Some(db.path()),
            _ => None,
        }
    }

    pub fn is_cluster(&self) -> bool {
        !matches!(self.0, Storage::File(_))
    }

    /// When this handle opened the file and redb had to repair it first: how long it took.
    pub fn repaired(&self) -> Option<Duration> {
        match &self.0 {
            Storage::File(db) => db.repaired(),
            _ => None,
        }
    }

    /// Whether commits wait for durability (a cluster's quorum always does).
    pub fn is_durable(&self) -> bool {
        match &self.0 {
            Storage::File(db) => db.is_durable(),
            _ => true,
        }
    }

    pub fn is_read_only(&self) -> bool {
        match &self.0 {
            Storage::File(db) => db.is_read_only(),
            _ => false,
        }
    }

    pub fn is_closed(&self) -> bool {
        each!(&self.0, db => db.is_closed())
    }

    /// Waits for this handle's commits in flight, releases its locks and rejects its waiters;
    /// closes the store if this was its last handle. Idempotent.
    pub fn close(&self) {
        let _ = self.try_close();
    }

    /// As [`Database::close`], and says whether anything acknowledged was lost (a file whose
    /// final sync failed).
    pub fn try_close(&self) -> Result<()> {
        match &self.0 {
            Storage::File(db) => db.try_close(),
            #[cfg(feature = "etcd")]
            Storage::Cluster(db) => db.close(),
            #[cfg(not(feature = "etcd"))]
            Storage::Never(never, _) => absurd(never),
        }
    }

    /// Writes a consistent copy of the whole store, as of one snapshot (one revision of a
    /// cluster), to the new file `dest`.
    pub fn backup(&self, dest: impl AsRef<Path>) -> Result<()> {
        self.begin_backup(dest)?.run()
    }

    /// Begins a backup to the new file `dest` (refused at once when it exists): a file's
    /// snapshot is taken now; a cluster's revision is read when the copy runs. Run the copy
    /// later, on any thread (not on a runtime thread of the etcd backend).
    pub fn begin_backup(&self, dest: impl AsRef<Path>) -> Result<Backup> {
        Ok(Backup(match &self.0 {
            Storage::File(db) => Storage::File(db.begin_backup(dest)?),
            #[cfg(feature = "etcd")]
            Storage::Cluster(db) => {
                if db.is_closed() {
                    return Err(Error::StoreClosed);
                }
                check_backup_dest(dest.as_ref())?;
                Storage::Cluster(ClusterBackup {
                    db: db.clone(),
                    dest: dest.as_ref().to_path_buf(),
                })
            }
            #[cfg(not(feature = "etcd"))]
            Storage::Never(never, _) => absurd(never),
        }))
    }

    /// Compacts the file (or the cluster's history); `done` hears whether anything was
    /// reclaimed.
    pub fn compact_with(&self, done: Box<dyn FnOnce(Result<bool>) + Send>) -> Result<()> {
        match &self.0 {
            Storage::File(db) => db.compact_with(done),
            #[cfg(feature = "etcd")]
            Storage::Cluster(db) => {
                let db = db.clone();
                std::thread::Builder::new()
                    .name("kvstore-compact".into())
                    .spawn(move || done(db.compact().map(|()| true)))?;
                Ok(())
            }
            #[cfg(not(feature = "etcd"))]
            Storage::Never(never, _) => absurd(never),
        }
    }

    /// Blocking [`Database::compact_with`].
    pub fn compact(&self) -> Result<bool> {
        match &self.0 {
            Storage::File(db) => db.compact(),
            #[cfg(feature = "etcd")]
            Storage::Cluster(db) => db.compact().map(|()| true),
            #[cfg(not(feature = "etcd"))]
            Storage::Never(never, _) => absurd(never),
        }
    }

    /// The maps of the store and the codec each was created with.
    pub fn tables(&self) -> Result<Vec<(String, String)>> {
        each!(&self.0, db => db.tables())
    }

    /// `done` hears once this handle's reads see everything committed anywhere before the call
    /// (at once for a file; for a cluster, once the replica caught up).
    pub fn sync_with(&self, done: Box<dyn FnOnce(Result<()>) + Send>) {
        match &self.0 {
            Storage::File(_) => done(Ok(())),
            #[cfg(feature = "etcd")]
            Storage::Cluster(db) => db.sync_with(done),
            #[cfg(not(feature = "etcd"))]
            Storage::Never(never, _) => absurd(never),
        }
    }

    /// Queues prepared commits (of any maps of this store) as one unit: they share a
    /// transaction where the storage can.
    pub fn submit(&self, commits: Vec<PreparedCommit>) {
        match &self.0 {
            Storage::File(db) => db.submit(self.file_commits(commits)),
            #[cfg(feature = "etcd")]
            Storage::Cluster(db) => db.submit(cluster_commits(commits)),
            #[cfg(not(feature = "etcd"))]
            Storage::Never(never, _) => absurd(never),
        }
    }

    /// As [`Database::submit`]; a file writes them on this thread when its writer is idle
    /// (true). A cluster always queues them (false).
    pub fn write_now(&self, commits: Vec<PreparedCommit>) -> bool {
        match &self.0 {
            Storage::File(db) => db.write_now(self.file_commits(commits)),
            _ => {
                self.submit(commits);
                false
            }
        }
    }

    fn file_commits(&self, commits: Vec<PreparedCommit>) -> Vec<file::PreparedCommit> {
        commits
            .into_iter()
            .filter_map(|c| match c.0 {
                Storage::File(c) => Some(c),
                // A map store only prepares commits for its own database's storage.
                _ => None,
            })
            .collect()
    }
}

/// A begun backup (see [`Database::begin_backup`]): [`Backup::run`] writes the new file.
pub struct Backup(Storage<FileBackup, ClusterBackup>);

impl Backup {
    /// Writes every map into a new file beside the destination, under a name of its own, and
    /// moves it into place only when complete, never over an existing file. Only that file is
    /// ever removed. Closing the store meanwhile ends the copy ([`Error::StoreClosed`]).
    pub fn run(self) -> Result<()> {
        each!(self.0, backup => backup.run())
    }
}

/// A backup of a cluster store: every map of the prefix as of one revision, with its codec and
/// auto-key bookkeeping, as an ordinary kvstore file.
#[cfg(feature = "etcd")]
pub(crate) struct ClusterBackup {
    db: ClusterDatabase,
    dest: std::path::PathBuf,
}

#[cfg(feature = "etcd")]
impl ClusterBackup {
    fn run(self) -> Result<()> {
        let check = || {
            if self.db.is_closed() {
                return Err(Error::StoreClosed);
            }
            Ok(())
        };
        check()?;
        let (revision, maps) = self.db.snapshot_all()?;
        let mut auto_keys = self.db.auto_keys(revision)?;
        check()?;
        let maps = maps.iter().map(|(name, codec, entries)| {
            let (leased_until, key_format) = auto_keys.remove(name).unwrap_or_default();
            MapContents {
                name: name.clone(),
                codec: codec.clone(),
                leased_until,
                key_format,
                entries: entries.iter(),
            }
        });
        write_store(&self.dest, maps, &check)
    }
}

#[cfg(feature = "etcd")]
fn cluster_commits(commits: Vec<PreparedCommit>) -> Vec<ClusterCommit> {
    commits
        .into_iter()
        .filter_map(|c| match c.0 {
            Storage::Cluster(c) => Some(c),
            _ => None,
        })
        .collect()
}

/// What a walk over a cluster replica knows of its store: whether the handle closed.
#[cfg(feature = "etcd")]
struct ClusterWalk(ClusterDatabase);

#[cfg(feature = "etcd")]
impl crate::range::WalkSource for ClusterWalk {
    fn closed(&self) -> bool {
        self.0.is_closed()
    }

    fn failed(&self, err: Error) -> Error {
        err
    }
}

impl MapStore {
    pub fn name(&self) -> &str {
        each!(&self.0, map => map.name())
    }

    pub fn codec(&self) -> &str {
        each!(&self.0, map => map.codec())
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
        each!(&self.0, map => map.acquire(key, ticket, make_waiter))
    }

    /// Turns a grant into a locked entry per `mode`, with the latest committed record. On
    /// failure the lock is released and the error returned.
    pub fn finish_acquire(&self, key: &str, grant: Grant, mode: LockMode) -> Result<LockedEntry> {
        each!(&self.0, map => map.finish_acquire(key, grant, mode))
    }

    /// Gives up a queued wait (timeout, abort). False if it was granted meanwhile.
    pub fn cancel_wait(&self, ticket: u64, reason: Error) -> bool {
        each!(&self.0, map => map.cancel_wait(ticket, reason))
    }

    /// Drops a lock without writing.
    pub fn release(&self, key: &str, token: LockToken) -> Result<()> {
        each!(&self.0, map => map.release(key, token))
    }

    /// Whether `token` still holds `key`'s lock.
    pub fn holds(&self, key: &str, token: LockToken) -> bool {
        each!(&self.0, map => map.holds(key, token))
    }

    /// Queues a write of `key` under its lock. Errors found before queueing come back at once;
    /// the rest reach `done`.
    pub fn commit(
        &self,
        key: &str,
        token: LockToken,
        change: Change,
        options: CommitOptions,
        done: CommitCallback,
    ) -> Result<()> {
        each!(&self.0, map => map.commit(key, token, change, options, done))
    }

    /// Checks a commit as [`MapStore::commit`] does, without queueing it yet; hand a group of
    /// them to [`Database::submit`] to have them share a transaction.
    pub fn prepare_commit(
        &self,
        key: &str,
        token: LockToken,
        change: Change,
        options: CommitOptions,
        done: CommitCallback,
    ) -> Result<PreparedCommit> {
        Ok(PreparedCommit(match &self.0 {
            Storage::File(map) => {
                Storage::File(map.prepare_commit(key, token, change, options, done)?)
            }
            #[cfg(feature = "etcd")]
            Storage::Cluster(map) => {
                Storage::Cluster(map.prepare_commit(key, token, change, options, done)?)
            }
            #[cfg(not(feature = "etcd"))]
            Storage::Never(never, _) => absurd(never),
        }))
    }

    // ---- reads ----

    /// The committed record of `key` (a cluster's: from the local replica).
    pub fn get(&self, key: &str) -> Result<Option<Arc<[u8]>>> {
        each!(&self.0, map => map.get(key))
    }

    /// A walk over one snapshot of the map.
    pub fn range(&self, options: &RangeOptions) -> Result<EntryRange> {
        match &self.0 {
            Storage::File(map) => map.range(options),
            #[cfg(feature = "etcd")]
            Storage::Cluster(map) => {
                let walk = Arc::new(ClusterWalk(map.database().clone()));
                EntryRange::replica(map.snapshot()?, options, &map.database().url(), walk)
            }
            #[cfg(not(feature = "etcd"))]
            Storage::Never(never, _) => absurd(never),
        }
    }

    pub fn count(&self, options: &RangeOptions) -> Result<u64> {
        match &self.0 {
            Storage::File(map) => map.count(options),
            #[cfg(feature = "etcd")]
            Storage::Cluster(_) => {
                let mut n = 0;
                for item in self.range(options)? {
                    item?;
                    n += 1;
                }
                Ok(n)
            }
            #[cfg(not(feature = "etcd"))]
            Storage::Never(never, _) => absurd(never),
        }
    }

    // ---- auto keys ----

    /// The next auto key. When the current lease is used up, `make_waiter`'s callback hears
    /// the key once the next lease is taken.
    pub fn next_key(
        &self,
        make_waiter: impl FnOnce() -> Box<dyn FnOnce(Result<String>) + Send>,
    ) -> Result<NextKey> {
        each!(&self.0, map => map.next_key(make_waiter))
    }

    // ---- watches ----

    /// Starts a watch of this map: every change committed from now on — from every handle and
    /// thread of the process (file), or from every process (cluster) — in commit order, each
    /// transaction's changes together. Read it with [`Watcher::poll`] (a callback wakes the
    /// reader) or [`Watcher::recv`] (blocking). A reader more than `high_water_mark` changes
    /// behind gets [`Error::WatchOverflow`]; closing this handle ends the watch.
    pub fn watch(&self, options: &WatchOptions) -> Result<Watcher> {
        match &self.0 {
            Storage::File(map) => map.watch(options),
            #[cfg(feature = "etcd")]
            Storage::Cluster(map) => map.watch(options),
            #[cfg(not(feature = "etcd"))]
            Storage::Never(never, _) => absurd(never),
        }
    }

    // ---- insight ----

    pub fn stats(&self) -> Result<MapStats> {
        match &self.0 {
            Storage::File(map) => map.stats(),
            #[cfg(feature = "etcd")]
            Storage::Cluster(map) => {
                let replica = map.revision();
                Ok(MapStats {
                    replica_revision: Some(replica.revision),
                    replica_lag: Some(replica.lag),
                    ..map.stats()?
                })
            }
            #[cfg(not(feature = "etcd"))]
            Storage::Never(never, _) => absurd(never),
        }
    }

    // ---- the blocking API for Rust callers ----

    /// Waits for `key`'s lock (up to `timeout`) and returns the entry locked per `mode`.
    pub fn lock(&self, key: &str, mode: LockMode, timeout: Option<Duration>) -> Result<EntryGuard> {
        Ok(EntryGuard(match &self.0 {
            Storage::File(map) => Storage::File(map.lock(key, mode, timeout)?),
            #[cfg(feature = "etcd")]
            Storage::Cluster(map) => Storage::Cluster(map.lock(key, mode, timeout)?),
            #[cfg(not(feature = "etcd"))]
            Storage::Never(never, _) => absurd(never),
        }))
    }

    /// Locks a new entry under the next auto key.
    pub fn lock_new_auto(&self) -> Result<EntryGuard> {
        let key = self.next_key_blocking()?;
        self.lock(&key, LockMode::New, None)
    }

    /// The next auto key, waiting for a lease when needed.
    pub fn next_key_blocking(&self) -> Result<String> {
        each!(&self.0, map => map.next_key_blocking())
    }

    /// The committed record of `key`, decoded.
    pub fn get_record(&self, key: &str) -> Result<Option<Record>> {
        each!(&self.0, map => map.get_record(key))
    }

    /// Deletes `key` under its lock; idempotent.
    pub fn delete(&self, key: &str) -> Result<()> {
        each!(&self.0, map => map.delete(key))
    }
}

impl EntryGuard {
    pub fn key(&self) -> &str {
        each!(&self.0, guard => guard.key())
    }

    /// Whether the entry existed when the lock was granted.
    pub fn existed(&self) -> bool {
        each!(&self.0, guard => guard.existed())
    }

    pub fn token(&self) -> LockToken {
        each!(&self.0, guard => guard.token())
    }

    /// The committed record when the lock was granted.
    pub fn record(&self) -> Option<&[u8]> {
        each!(&self.0, guard => guard.record())
    }

    pub fn decoded(&self) -> Result<Option<Record>> {
        each!(&self.0, guard => guard.decoded())
    }

    /// Writes `record` and releases the lock.
    pub fn commit(self, record: Vec<u8>) -> Result<()> {
        each!(self.0, guard => guard.commit(record))
    }

    /// Writes `record` per `options`; with `update_only` the guard keeps the lock.
    pub fn commit_with(&mut self, record: Vec<u8>, options: CommitOptions) -> Result<()> {
        each!(&mut self.0, guard => guard.commit_with(record, options))
    }

    /// Deletes the entry and releases the lock.
    pub fn delete(self) -> Result<()> {
        each!(self.0, guard => guard.delete())
    }

    /// Releases the lock without writing.
    pub fn release(self) {
        each!(self.0, guard => guard.release())
    }
}
