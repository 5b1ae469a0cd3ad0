//! The etcd storage engine: the same maps, locks, commits and auto keys as the file backend,
//! shared by every process and host that opens the same cluster and prefix.
//!
//! - [`ClusterDatabase::open`] takes `etcd://host:port[,host:port...]/prefix` (`etcds://` for
//!   TLS). Handles on the same cluster and prefix in one process share one core (one session
//!   lease, one replica, one committer); each handle owns the locks it takes.
//! - Locks are per key across processes (see `locks.rs` for the recipe and the fairness
//!   trade-off), held by the core's session lease (`session.rs`).
//! - Commits are fenced: each is written only if its lock key still has the create revision
//!   it had when the lock was granted, in the same transaction, so a holder whose session
//!   expired gets [`Error::LockLost`] and writes nothing. Concurrent commits share etcd
//!   transactions (`commits.rs`).
//! - Reads are synchronous, from a local replica fed by a watch (`replica.rs`); a process sees
//!   its own commits once they are acknowledged; [`ClusterDatabase::sync_with`] waits until
//!   the replica holds everything committed anywhere before the call.
//!
//! Everything runs on one process-wide tokio runtime (two worker threads). Callbacks (grants,
//! commit outcomes, auto keys, syncs) run on it: they must not block on this backend (the
//! blocking calls refuse there with [`Error::InvalidArgument`]).

mod autokeys;
mod batcher;
mod client;
mod commits;
mod core;
mod layout;
mod locks;
mod replica;
mod session;
mod url;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::Duration;

use crate::blocking;
use crate::envelope::{self, Record};
use crate::error::{Error, Result};
use crate::keys::{validate_key, KeyFormat};
use crate::locks::{Acquire, Grant, GrantCallback, LockToken, OwnerId};
use crate::watch::{WatchOptions, Watcher};
use crate::{
    Change, CommitCallback, CommitOptions, LockMode, LockedEntry, MapOptions, MapStats, NextKey,
};

use self::client::{block_on, refuse_on_runtime, runtime};
use self::core::{Core, TableState};
use self::url::ClusterUrl;

pub use self::commits::ClusterCommit;
pub use self::replica::{NamedSnapshot, ReplicaStats, Snapshot};

/// Largest record one commit may write to a cluster with etcd's default request limit.
pub const MAX_CLUSTER_RECORD_BYTES: usize = client::MAX_REQUEST_BYTES - client::REQUEST_OVERHEAD;

/// Each map's auto-key bookkeeping (see [`ClusterDatabase::auto_keys`]): name → (the end of
/// its last auto-key lease, the format its auto keys are made in), each when recorded.
pub type AutoKeys = HashMap<String, (Option<u64>, Option<KeyFormat>)>;

/// Options of the connection; the first opener of a cluster and prefix in a process decides.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// The session lease's TTL, rounded up to whole seconds: a process that dies or is cut off
    /// for longer loses its locks.
    pub session_ttl: Duration,
    /// Every request to the cluster is bounded by this; then [`Error::Unavailable`].
    pub request_timeout: Duration,
    /// etcd user name and password.
    pub auth: Option<(String, String)>,
    /// For `etcds://`.
    pub tls: Option<ClusterTls>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            session_ttl: Duration::from_secs(10),
            request_timeout: Duration::from_secs(5),
            auth: None,
            tls: None,
        }
    }
}

/// TLS material, PEM-encoded.
#[derive(Debug, Clone, Default)]
pub struct ClusterTls {
    /// The CA to trust (else the system's roots).
    pub ca: Option<Vec<u8>>,
    /// Client certificate and key, for clusters that check clients.
    pub cert: Option<Vec<u8>>,
    pub key: Option<Vec<u8>>,
}

/// The cores open in this process, by cluster, prefix and credentials.
struct Slot {
    core: Option<Arc<Core>>,
    handles: usize,
}

fn registry() -> &'static Mutex<HashMap<String, Arc<Mutex<Slot>>>> {
    static REGISTRY: OnceLock<Mutex<HashMap<String, Arc<Mutex<Slot>>>>> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

static NEXT_OWNER: AtomicU64 = AtomicU64::new(1);

struct Handle {
    core: Arc<Core>,
    owner: OwnerId,
    /// Its commits in flight, and whether it is closed.
    in_flight: Arc<commits::InFlight>,
    /// The registry's slot; None for a core of its own ([`ClusterDatabase::open_unshared`]).
    slot: Option<Arc<Mutex<Slot>>>,
}

impl Handle {
    fn close(&self) {
        if !self.in_flight.close() {
            return;
        }
        let (core, owner, slot) = (self.core.clone(), self.owner, self.slot.clone());
        if tokio::runtime::Handle::try_current().is_ok() {
            // This thread must not wait. The locks still go only once this handle's commits in
            // flight have landed (else the next holder here would get a lock at once, under
            // the same fence, while a write under it is still on its way): on a thread of the
            // blocking pool.
            let in_flight = self.in_flight.clone();
            runtime().spawn_blocking(move || {
                in_flight.wait();
                release_handle(&core, owner, slot.as_deref(), true);
            });
        } else {
            // Commits submitted through this handle land before its locks go.
            self.in_flight.wait();
            release_handle(&core, owner, slot.as_deref(), false);
        }
    }
}

/// The rest of a handle's close, once its commits have landed: its locks, waits and watches go,
/// and the last handle of the core shuts it down.
fn release_handle(core: &Arc<Core>, owner: OwnerId, slot: Option<&Mutex<Slot>>, on_runtime: bool) {
    for table in core.all_tables() {
        locks::release_owner(core, &table, owner);
    }
    core.replica.watchers.close_owner(owner);
    let last = match slot {
        None => true,
        Some(slot) => {
            let mut slot = slot.lock().unwrap_or_else(|p| p.into_inner());
            slot.handles -= 1;
            if slot.handles == 0 {
                slot.core = None;
                true
            } else {
                false
            }
        }
    };
    if last {
        let core = core.clone();
        if on_runtime {
            runtime().spawn(async move { core.shutdown().await });
        } else {
            runtime().block_on(core.shutdown());
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.close();
    }
}

/// A handle on a store in an etcd cluster. Cheap to clone; every clone is the same handle.
#[derive(Clone)]
pub struct ClusterDatabase {
    handle: Arc<Handle>,
}

impl ClusterDatabase {
    /// Connects to `etcd://host:port[,host:port...]/prefix` (or `etcds://`), or joins the core
    /// already open in this process for the same cluster, prefix and user. Blocking.
    pub fn open(url: &str, options: ClusterOptions) -> Result<ClusterDatabase> {
        let parsed = ClusterUrl::parse(url)?;
        check_options(&options)?;
        let name = format!("{} {:016x}", parsed.normalized(), credentials(&options));
        let slot = registry()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(name)
            .or_insert_with(|| {
                Arc::new(Mutex::new(Slot {
                    core: None,
                    handles: 0,
                }))
            })
            .clone();
        let mut held = slot.lock().unwrap_or_else(|p| p.into_inner());
        let core = match &held.core {
            Some(core) => core.clone(),
            None => {
                let core = block_on("open an etcd store", Core::open(parsed, &options))?;
                held.core = Some(core.clone());
                core
            }
        };
        held.handles += 1;
        drop(held);
        Ok(Self::with_core(core, Some(slot)))
    }

    /// Opens a core of its own, shared with no other handle, as a second process would: its
    /// own session, replica and locks (for tests of several processes in one).
    #[doc(hidden)]
    pub fn open_unshared(url: &str, options: ClusterOptions) -> Result<ClusterDatabase> {
        let parsed = ClusterUrl::parse(url)?;
        check_options(&options)?;
        let core = block_on("open an etcd store", Core::open(parsed, &options))?;
        Ok(Self::with_core(core, None))
    }

    fn with_core(core: Arc<Core>, slot: Option<Arc<Mutex<Slot>>>) -> ClusterDatabase {
        ClusterDatabase {
            handle: Arc::new(Handle {
                core,
                owner: NEXT_OWNER.fetch_add(1, Ordering::Relaxed),
                in_flight: Arc::default(),
                slot,
            }),
        }
    }

    fn core(&self) -> &Arc<Core> {
        &self.handle.core
    }

    fn check_open(&self) -> Result<()> {
        if self.is_closed() {
            return Err(Error::StoreClosed);
        }
        Ok(())
    }

    /// `etcd://…/prefix` as normalized (endpoints sorted).
    pub fn url(&self) -> String {
        self.core().url.normalized()
    }

    /// Opens a map, recording its codec under the prefix on first use (another codec →
    /// [`Error::CodecMismatch`]).
    pub fn map_store(&self, name: &str, options: &MapOptions) -> Result<ClusterMap> {
        self.check_open()?;
        if name.is_empty() || name.len() > 255 {
            return Err(Error::invalid(
                "a table name must be between 1 and 255 bytes",
            ));
        }
        if options.bandwidth == 0 {
            return Err(Error::invalid("keys.bandwidth must be at least 1"));
        }
        let core = self.core().clone();
        let table = block_on("open a map", async { core.table(name, options).await })?;
        Ok(ClusterMap {
            db: self.clone(),
            table,
            keys: options.keys,
        })
    }

    /// The maps under the prefix and the codec each was created with.
    pub fn tables(&self) -> Result<Vec<(String, String)>> {
        self.check_open()?;
        block_on("list the maps", self.core().list_tables())
    }

    /// Waits for this handle's commits in flight, releases its locks and rejects its waiters
    /// (StoreClosed); the last handle of the core also gives back unused auto keys, revokes
    /// the session lease and stops the core's tasks. Idempotent. On a thread of a tokio
    /// runtime it does not wait: the handle is closed at once (new calls refused), and its
    /// locks and watches go (and the core stops) once its commits in flight have landed.
    pub fn close(&self) -> Result<()> {
        self.handle.close();
        Ok(())
    }

    pub fn is_closed(&self) -> bool {
        self.handle.in_flight.is_closed()
    }

    /// Queues prepared commits; concurrent ones share etcd transactions (group commit). Each
    /// commit's callback hears its own outcome.
    pub fn submit(&self, commits: Vec<ClusterCommit>) {
        let core = self.core();
        for mut commit in commits {
            // Counted by this handle and by each handle whose locks it writes under, before
            // the closed checks: a close that has not seen it yet waits for it before
            // releasing the locks it writes under.
            let mut in_flight = vec![self.handle.in_flight.clone()];
            for handle in commit.in_flight.drain(..) {
                if !in_flight.iter().any(|h| Arc::ptr_eq(h, &handle)) {
                    in_flight.push(handle);
                }
            }
            for handle in &in_flight {
                handle.start(1);
            }
            commit.in_flight = in_flight;
            let refused = if commit.in_flight.iter().any(|h| h.is_closed()) {
                // Closing released that handle's locks: its commits may no longer write.
                Some(Error::StoreClosed)
            } else if commit.core != Arc::as_ptr(core) as usize {
                // Nothing written, the locks still held.
                Some(Error::invalid(
                    "a commit must be submitted to the store whose maps prepared it",
                ))
            } else {
                commit.refused.take()
            };
            if let Some(err) = refused {
                // A callback that panics neither skips the others nor leaves the commit
                // counted (close would wait for it forever).
                for done in commit.done.drain(..) {
                    commits::tell(done, Err(err.clone()));
                }
                for handle in commit.in_flight.drain(..) {
                    handle.finish();
                }
                continue;
            }
            core.commits.submit(core, commit);
        }
    }

    /// `done` hears Ok once the replica holds everything committed anywhere before this call
    /// (read after it to read linearizably).
    pub fn sync_with(&self, done: Box<dyn FnOnce(Result<()>) + Send>) {
        if let Err(err) = self.check_open() {
            return done(Err(err));
        }
        let core = self.core().clone();
        runtime().spawn(async move { done(core.sync().await) });
    }

    /// Blocking [`ClusterDatabase::sync_with`].
    pub fn sync(&self) -> Result<()> {
        self.check_open()?;
        block_on("sync", self.core().sync())
    }

    /// Compacts the cluster's history up to its current revision.
    pub fn compact(&self) -> Result<()> {
        self.check_open()?;
        block_on("compact", self.core().compact())
    }

    /// Every map (name, codec, entries) as of one revision, read from the cluster.
    pub fn snapshot_all(&self) -> Result<(i64, Vec<NamedSnapshot>)> {
        self.check_open()?;
        block_on("snapshot the store", self.core().snapshot_all())
    }

    /// Read-only: the auto-key bookkeeping of every map under the prefix as of `revision` (as
    /// [`ClusterDatabase::snapshot_all`] returned it), or as of now when etcd has compacted that
    /// revision away (a counter read later is still past every number handed out by then).
    pub fn auto_keys(&self, revision: i64) -> Result<AutoKeys> {
        self.check_open()?;
        let core = self.core().clone();
        let (seq_prefix, keys_prefix) = (core.layout.seq_key(""), core.layout.keys_key(""));
        let meta = format!("{}meta/", core.layout.root());
        let what = "reading the auto-key counters";
        let answer = block_on(what, async {
            for at in [revision, 0] {
                let mut options = etcd_client::GetOptions::new().with_prefix();
                if at > 0 {
                    options = options.with_revision(at);
                }
                let read = core
                    .cluster
                    .call(what, client::Effect::Nothing, || {
                        let mut kv = core.cluster.kv.clone();
                        let (key, options) = (meta.clone(), options.clone());
                        async move {
                            match kv.get(key, Some(options)).await {
                                Ok(answer) => Ok(Some(answer)),
                                Err(e) if client::classify(&e).0 == client::Kind::Compacted => {
                                    Ok(None)
                                }
                                Err(e) => Err(e),
                            }
                        }
                    })
                    .await?;
                if let Some(answer) = read {
                    return Ok(answer);
                }
            }
            Err(client::unavailable(
                what,
                client::Effect::Nothing,
                "compacted",
            ))
        })?;
        let mut found = AutoKeys::new();
        for kv in answer.kvs() {
            let key = String::from_utf8_lossy(kv.key());
            if let Some(name) = key.strip_prefix(&seq_prefix) {
                let name = layout::unescape_table(name);
                let until = self::core::parse_counter(kv.value(), &name)?;
                found.entry(name).or_default().0 = Some(until);
            } else if let Some(name) = key.strip_prefix(&keys_prefix) {
                let format = KeyFormat::decode(kv.value());
                found.entry(layout::unescape_table(name)).or_default().1 = format;
            }
        }
        Ok(found)
    }

    /// The replica's revision, lag and connection.
    pub fn replica_stats(&self) -> ReplicaStats {
        self.core().replica.stats()
    }

    /// Test hook: the session lease (to revoke it from outside).
    #[doc(hidden)]
    pub fn session_lease(&self) -> Option<i64> {
        self.core().session.current().map(|l| l.id)
    }

    /// Times the session was lost since open.
    pub fn session_losses(&self) -> u64 {
        self.core().session.losses()
    }

    /// Test hook: stop sending keep-alives (the lease then expires) or resume.
    #[doc(hidden)]
    pub fn pause_keep_alive(&self, paused: bool) {
        self.core().session.pause(paused);
    }

    /// Test hook: the next `count` commit transactions are applied by the cluster but their
    /// answer is dropped (the callers hear UnavailableError: an unknown outcome).
    #[doc(hidden)]
    pub fn lose_commit_answers(&self, count: u64) {
        self.core()
            .stats
            .lose_answers
            .store(count, std::sync::atomic::Ordering::SeqCst);
    }

    /// Test hook: drop the replica's watch (it falls behind) or let it resume.
    #[doc(hidden)]
    pub fn pause_replica(&self, paused: bool) {
        self.core().replica.pause(paused);
    }

    /// Test hook: blocks until at least `count` waits for a lock key ahead in the queue were
    /// registered by this core (false after `timeout`).
    #[doc(hidden)]
    pub fn wait_lock_waits(&self, count: u64, timeout: Duration) -> bool {
        let mut waits = self.core().replica.lock_waits();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .expect("a runtime");
            let reached = rt.block_on(async {
                tokio::time::timeout(timeout, waits.wait_for(|n| *n >= count))
                    .await
                    .is_ok_and(|r| r.is_ok())
            });
            let _ = tx.send(reached);
        });
        rx.recv().unwrap_or(false)
    }
}

/// A fingerprint of the credentials: handles share a core only when they would connect as the
/// same user with the same secrets (a wrong password must not join a core opened with the right
/// one).
fn credentials(options: &ClusterOptions) -> u64 {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let mut hasher = DefaultHasher::new();
    options.auth.hash(&mut hasher);
    if let Some(tls) = &options.tls {
        (&tls.ca, &tls.cert, &tls.key).hash(&mut hasher);
    }
    hasher.finish()
}

fn check_options(options: &ClusterOptions) -> Result<()> {
    if options.request_timeout.is_zero() {
        return Err(Error::invalid("requestTimeoutMs must be positive"));
    }
    if options.session_ttl.is_zero() {
        return Err(Error::invalid("sessionTtlMs must be positive"));
    }
    Ok(())
}

/// One named map of a [`ClusterDatabase`], through one handle.
#[derive(Clone)]
pub struct ClusterMap {
    db: ClusterDatabase,
    table: Arc<TableState>,
    /// How this opener spells auto keys; it must match how the table's keys were generated.
    keys: KeyFormat,
}

impl ClusterMap {
    pub fn name(&self) -> &str {
        &self.table.name
    }

    pub fn codec(&self) -> &str {
        &self.table.codec
    }

    pub fn database(&self) -> &ClusterDatabase {
        &self.db
    }

    fn core(&self) -> &Arc<Core> {
        self.db.core()
    }

    fn owner(&self) -> OwnerId {
        self.db.handle.owner
    }

    // ---- locks ----

    /// Asks for `key`'s lock. Granted at once only when this process already holds the key's
    /// etcd lock and no one here holds it; otherwise `make_waiter`'s callback hears the grant
    /// (or why it never came). `ticket` names the wait for [`ClusterMap::cancel_wait`].
    pub fn acquire(
        &self,
        key: &str,
        ticket: u64,
        make_waiter: impl FnOnce() -> Result<GrantCallback>,
    ) -> Result<Acquire> {
        self.db.check_open()?;
        validate_key(key)?;
        // A waiter that saw the record when it queued and finds none when granted had it
        // deleted under it, by this process or another: EntryDeleted, as a hand-over after a
        // local delete says (the grant from etcd cannot say it).
        let existed = self.core().replica.get(&self.table.name, key).is_some();
        let waiter = || {
            let notify = make_waiter()?;
            let notify: GrantCallback = Box::new(move |outcome: Result<Grant>| {
                notify(outcome.map(|mut grant| {
                    grant.after_delete |= existed;
                    grant
                }))
            });
            Ok(notify)
        };
        locks::acquire(self.core(), &self.table, self.owner(), key, ticket, waiter)
    }

    /// Turns a grant into a locked entry per `mode`. The record is the latest committed value:
    /// read from the cluster when the etcd lock was taken (or kept by this process's own
    /// commits since). On failure the lock is released and the error returned.
    pub fn finish_acquire(&self, key: &str, grant: Grant, mode: LockMode) -> Result<LockedEntry> {
        if let Err(err) = self.db.check_open() {
            let _ = self.release(key, grant.token);
            return Err(err);
        }
        let record = self.core().replica.get(&self.table.name, key);
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
            let after_delete = grant.after_delete && record.is_none();
            let _ = locks::release(self.core(), &self.table, key, grant.token, after_delete);
            return Err(err);
        }
        Ok(LockedEntry {
            token: grant.token,
            existed: record.is_some(),
            record,
        })
    }

    /// Gives up a wait (timeout, abort). False if it was granted meanwhile: the grant then
    /// stands and must be used or released.
    pub fn cancel_wait(&self, ticket: u64, reason: Error) -> bool {
        locks::cancel_wait(self.core(), &self.table, self.owner(), ticket, reason)
    }

    /// Drops a lock without writing.
    pub fn release(&self, key: &str, token: LockToken) -> Result<()> {
        locks::release(self.core(), &self.table, key, token, false)
    }

    /// Whether `token` still holds `key`'s lock: here, and in etcd as far as this process
    /// knows (a lost session or a deleted lock key ends it).
    pub fn holds(&self, key: &str, token: LockToken) -> bool {
        self.table.locks.holds(self.core(), key, token)
    }

    /// Checks a commit of `key` under its lock, to be queued with
    /// [`ClusterDatabase::submit`]. Errors found now (a released or lost lock, bad options, an
    /// oversize record) come back at once, the lock released unless `hold_lock_on_failure`.
    pub fn prepare_commit(
        &self,
        key: &str,
        token: LockToken,
        change: Change,
        options: CommitOptions,
        done: CommitCallback,
    ) -> Result<ClusterCommit> {
        if matches!(change, Change::Delete) && options.update_only {
            return Err(Error::invalid(
                "commit cannot both delete and keep the lock (delete with updateOnly)",
            ));
        }
        let checked = self
            .db
            .check_open()
            .and_then(|_| self.table.locks.fence(self.core(), key, token))
            .and_then(|etcd| {
                if let Change::Put(record) = &change {
                    commits::check_size(key, record)?;
                }
                Ok(etcd)
            });
        let etcd = match checked {
            Ok(etcd) => etcd,
            Err(err @ Error::LockReleased { .. }) => return Err(err),
            Err(err) => {
                if !options.hold_lock_on_failure {
                    let _ = self.release(key, token);
                }
                return Err(err);
            }
        };
        Ok(ClusterCommit {
            writes: vec![commits::Write {
                table: self.table.clone(),
                key: key.to_string(),
                token,
                etcd,
                data_key: self.core().layout.data_key(&self.table.name, key),
                change,
                release: !options.update_only,
                hold_on_failure: options.hold_lock_on_failure,
                fold_release: false,
            }],
            done: vec![done],
            in_flight: vec![self.db.handle.in_flight.clone()],
            core: Arc::as_ptr(self.core()) as usize,
            refused: None,
        })
    }

    /// [`ClusterMap::prepare_commit`] and submit.
    pub fn commit(
        &self,
        key: &str,
        token: LockToken,
        change: Change,
        options: CommitOptions,
        done: CommitCallback,
    ) -> Result<()> {
        let commit = self.prepare_commit(key, token, change, options, done)?;
        self.db.submit(vec![commit]);
        Ok(())
    }

    // ---- reads ----

    /// The committed record of `key`, from the replica.
    pub fn get(&self, key: &str) -> Result<Option<Arc<[u8]>>> {
        self.db.check_open()?;
        validate_key(key)?;
        Ok(self.core().replica.get(&self.table.name, key))
    }

    /// An O(1) consistent copy of this map's replica, for walks and counts.
    pub fn snapshot(&self) -> Result<Snapshot> {
        self.db.check_open()?;
        Ok(self.core().replica.snapshot(&self.table.name))
    }

    // ---- auto keys ----

    /// The next auto key. When the current lease is used up, `make_waiter`'s callback hears
    /// the key once the next block is leased from the cluster.
    pub fn next_key(
        &self,
        make_waiter: impl FnOnce() -> Box<dyn FnOnce(Result<String>) + Send>,
    ) -> Result<NextKey> {
        self.db.check_open()?;
        autokeys::next_key(self.core(), &self.table, self.keys, make_waiter)
    }

    // ---- insight ----

    /// Entries from the replica; locks and commit counters; `file_bytes` 0.
    pub fn stats(&self) -> Result<MapStats> {
        self.db.check_open()?;
        let core = self.core();
        let entries = core.replica.snapshot(&self.table.name).len() as u64;
        let locks = self.table.locks.counts();
        let commits = &core.stats;
        Ok(MapStats {
            entries,
            locks_held: locks.held,
            locks_waiting: locks.waiting,
            commits: commits.commits.load(Ordering::Relaxed),
            batches: commits.batches.load(Ordering::Relaxed),
            failed_batches: commits.failed_batches.load(Ordering::Relaxed),
            largest_batch: commits.largest_batch.load(Ordering::Relaxed),
            watchers: core.replica.watchers.count(&self.table.name) as u64,
            ..MapStats::default()
        })
    }

    // ---- watches ----

    /// Starts a watch of this map: every change the replica's watch brings from now on, from
    /// every process, in revision order (this process's commits when their event arrives). A
    /// commit this process already heard of (one that resolved before this call) is skipped.
    /// Closing this handle ends it; a reload of the replica after a compaction fails it.
    pub fn watch(&self, options: &WatchOptions) -> Result<Watcher> {
        self.db.check_open()?;
        let replica = &self.core().replica;
        let watcher = replica
            .watchers
            .watch(&self.table.name, self.owner(), options, || replica.seen())?;
        // A close that ran meanwhile may have ended this handle's watches before this one.
        self.db.check_open()?;
        Ok(watcher)
    }

    /// The replica's revision and lag (shared by every map of the core).
    pub fn revision(&self) -> ReplicaStats {
        self.core().replica.stats()
    }

    // ---- the blocking API for Rust callers ----

    /// Waits for `key`'s lock (up to `timeout`) and returns the entry locked per `mode`.
    pub fn lock(
        &self,
        key: &str,
        mode: LockMode,
        timeout: Option<Duration>,
    ) -> Result<ClusterGuard> {
        refuse_on_runtime("lock")?;
        Ok(ClusterGuard {
            map: self.clone(),
            key: key.to_string(),
            locked: blocking::lock(self, key, mode, timeout)?,
            held: true,
        })
    }

    /// The next auto key, waiting for a lease if needed.
    pub fn next_key_blocking(&self) -> Result<String> {
        blocking::next_key(self)
    }

    /// The committed record of `key` (replica), decoded from its envelope.
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

impl blocking::Waits for ClusterMap {
    fn acquire(
        &self,
        key: &str,
        ticket: u64,
        make_waiter: impl FnOnce() -> Result<GrantCallback>,
    ) -> Result<Acquire> {
        ClusterMap::acquire(self, key, ticket, make_waiter)
    }

    fn cancel_wait(&self, ticket: u64, reason: Error) -> bool {
        ClusterMap::cancel_wait(self, ticket, reason)
    }

    fn finish_acquire(&self, key: &str, grant: Grant, mode: LockMode) -> Result<LockedEntry> {
        ClusterMap::finish_acquire(self, key, grant, mode)
    }

    fn next_key(
        &self,
        make_waiter: impl FnOnce() -> Box<dyn FnOnce(Result<String>) + Send>,
    ) -> Result<NextKey> {
        ClusterMap::next_key(self, make_waiter)
    }

    fn check_may_wait(&self, what: &str) -> Result<()> {
        refuse_on_runtime(what)
    }
}

/// A held lock, for Rust callers. Dropping it releases the lock without writing.
pub struct ClusterGuard {
    map: ClusterMap,
    key: String,
    locked: LockedEntry,
    held: bool,
}

impl ClusterGuard {
    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn existed(&self) -> bool {
        self.locked.existed
    }

    pub fn token(&self) -> LockToken {
        self.locked.token
    }

    /// The latest committed record when the lock was granted (or last committed here).
    pub fn record(&self) -> Option<&[u8]> {
        self.locked.record.as_deref()
    }

    pub fn decoded(&self) -> Result<Option<Record>> {
        self.record().map(envelope::decode).transpose()
    }

    fn write(&mut self, change: Change, options: CommitOptions) -> Result<()> {
        refuse_on_runtime("commit")?;
        let (tx, rx) = mpsc::channel();
        let written = change.record();
        let outcome = self
            .map
            .commit(
                &self.key,
                self.locked.token,
                change,
                options,
                Box::new(move |r| {
                    let _ = tx.send(r);
                }),
            )
            .and_then(|()| rx.recv().map_err(|_| Error::StoreClosed)?);
        self.held = match &outcome {
            Ok(()) => options.update_only,
            Err(Error::LockReleased { .. }) => false,
            Err(_) => {
                options.hold_lock_on_failure
                    && self
                        .map
                        .table
                        .locks
                        .local
                        .holds(&self.key, self.locked.token)
            }
        };
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
            let _ = self.map.release(&self.key, self.locked.token);
        }
    }

    /// The map the lock was taken through, and whether this guard still has it (for a commit of
    /// several guards, `crate::Database::commit_guards`).
    pub(crate) fn map_if_held(&self) -> Option<&ClusterMap> {
        self.held.then_some(&self.map)
    }

    /// After a commit of several guards: as [`ClusterGuard::commit_with`] leaves the guard.
    pub(crate) fn group_committed(
        &mut self,
        outcome: &Result<()>,
        options: CommitOptions,
        written: Option<Arc<[u8]>>,
    ) {
        self.held = match outcome {
            Ok(()) => options.update_only,
            // Kept by a refusal or by `hold_lock_on_failure`.
            Err(_) => self
                .map
                .table
                .locks
                .local
                .holds(&self.key, self.locked.token),
        };
        if outcome.is_ok() {
            self.locked.existed = written.is_some();
            self.locked.record = written;
        }
    }
}

impl Drop for ClusterGuard {
    fn drop(&mut self) {
        self.release_now();
    }
}
