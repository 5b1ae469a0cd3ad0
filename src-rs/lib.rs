//! The Node binding: thin #[napi] wrappers over kvstore-core. No policy lives here; it converts
//! arguments, turns core callbacks into promises, and encodes core errors for the TS layer.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use std::sync::{Mutex, Weak};

use kvstore_core::etcd::{ClusterOptions, ClusterTls};
use kvstore_core::{
    Acquire, Change, CommitOptions, Database, DatabaseOptions, EntryRange, ErrorCode, Grant,
    KeyFormat, LockMode, LockedEntry, MapOptions, MapStore, NextKey, PreparedCommit, RangeOptions,
    WatchEvent, WatchNext, WatchOptions, Watcher,
};
use napi::bindgen_prelude::*;
use napi::{CleanupEnvHook, Env};
use napi_derive::napi;

mod mailbox;
use mailbox::{Mailbox, PendingGrant, SettleOnce, Settlement};

/// Core errors cross as `Error` objects whose message starts with the stable code (and errno),
/// e.g. `ERR_IO(28): No space left on device`; src-ts/errors.ts turns them into typed errors.
pub(crate) fn js_error(err: kvstore_core::Error) -> Error {
    let code = err.code().as_str();
    let message = match &err {
        kvstore_core::Error::Io {
            errno: Some(errno), ..
        } => format!("{code}({errno}): {err}"),
        _ => format!("{code}: {err}"),
    };
    Error::new(Status::GenericFailure, message)
}

trait OrJs<T> {
    fn or_js(self) -> Result<T>;
}

impl<T> OrJs<T> for kvstore_core::Result<T> {
    fn or_js(self) -> Result<T> {
        self.map_err(js_error)
    }
}

/// Every stable error code, so the TS layer can check its table against the core's.
#[napi(catch_unwind)]
pub fn error_codes() -> Vec<String> {
    ErrorCode::ALL
        .iter()
        .map(|c| c.as_str().to_string())
        .collect()
}

/// redb's integrity check of a file that is not open anywhere.
#[napi(catch_unwind)]
pub fn check_integrity(path: String) -> Result<bool> {
    kvstore_core::check_integrity(&path).or_js()
}

#[napi(object)]
pub struct NativeOpenOptions {
    pub page_cache_bytes: Option<f64>,
    pub durable: Option<bool>,
    pub sync_interval_ms: Option<f64>,
    pub read_only: Option<bool>,
    /// etcd only: the session lease's TTL, the bound of every request, credentials and TLS.
    pub session_ttl_ms: Option<f64>,
    pub request_timeout_ms: Option<f64>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub tls_ca: Option<Buffer>,
    pub tls_cert: Option<Buffer>,
    pub tls_key: Option<Buffer>,
}

/// Where and how to open, decided on the JS thread (the options hold JS buffers); the open
/// itself may then run on another thread.
enum OpenPlan {
    File(String, DatabaseOptions),
    Cluster(String, ClusterOptions),
}

impl OpenPlan {
    /// A file, or a cluster when `location` is an `etcd://` or `etcds://` URL.
    fn new(location: String, options: NativeOpenOptions) -> OpenPlan {
        let ms = |ms: f64| std::time::Duration::from_secs_f64(ms / 1000.0);
        if Database::is_cluster_url(&location) {
            let defaults = ClusterOptions::default();
            let pem = |b: Option<Buffer>| b.map(|b| b.to_vec());
            let tls =
                (options.tls_ca.is_some() || options.tls_cert.is_some()).then(|| ClusterTls {
                    ca: pem(options.tls_ca),
                    cert: pem(options.tls_cert),
                    key: pem(options.tls_key),
                });
            return OpenPlan::Cluster(
                location,
                ClusterOptions {
                    session_ttl: options.session_ttl_ms.map_or(defaults.session_ttl, ms),
                    request_timeout: options
                        .request_timeout_ms
                        .map_or(defaults.request_timeout, ms),
                    auth: options.username.zip(options.password),
                    tls,
                },
            );
        }
        let defaults = DatabaseOptions::default();
        OpenPlan::File(
            location,
            DatabaseOptions {
                page_cache_bytes: options
                    .page_cache_bytes
                    .map_or(defaults.page_cache_bytes, |b| b as usize),
                durable: options.durable.unwrap_or(defaults.durable),
                sync_interval: options.sync_interval_ms.map_or(defaults.sync_interval, ms),
                backend: None,
                read_only: options.read_only.unwrap_or(false),
            },
        )
    }

    fn open(self) -> kvstore_core::Result<Database> {
        match self {
            OpenPlan::File(path, options) => Database::open(&path, options),
            OpenPlan::Cluster(url, options) => Database::open_cluster(&url, options),
        }
    }
}

/// Opens on a thread of libuv's pool: connecting to a cluster and loading its replica takes
/// round trips (seconds when the cluster is down), which must not stall the event loop.
pub struct OpenTask(Option<OpenPlan>);

impl Task for OpenTask {
    type Output = Database;
    type JsValue = NativeDatabase;

    fn compute(&mut self) -> Result<Database> {
        let plan = self
            .0
            .take()
            .ok_or_else(|| Error::from_reason("the open ran twice"))?;
        plan.open().or_js()
    }

    fn resolve(&mut self, env: Env, db: Database) -> Result<NativeDatabase> {
        NativeDatabase::attach(&env, db)
    }
}

/// As `NativeDatabase.open`, off the event loop (for clusters).
#[napi(ts_return_type = "Promise<NativeDatabase>")]
pub fn open_database(path: String, options: NativeOpenOptions) -> AsyncTask<OpenTask> {
    AsyncTask::new(OpenTask(Some(OpenPlan::new(path, options))))
}

#[napi(object)]
pub struct NativeTableInfo {
    pub name: String,
    pub codec: String,
}

#[napi(object)]
pub struct NativeMapOptions {
    pub codec: String,
    pub cache_capacity: Option<f64>,
    pub cache_bytes: Option<f64>,
    pub key_width: Option<u32>,
    pub key_base: Option<u32>,
    pub bandwidth: Option<f64>,
}

#[napi]
pub struct NativeDatabase {
    db: Database,
    mailbox: Arc<Mailbox>,
    /// Commits of this JS turn, queued together by `flush` so they share a transaction.
    pending: Arc<Mutex<Vec<PreparedCommit>>>,
    cleanup: Option<CleanupEnvHook<Database>>,
}

fn take_pending(pending: &Mutex<Vec<PreparedCommit>>) -> Vec<PreparedCommit> {
    std::mem::take(&mut *pending.lock().unwrap_or_else(|p| p.into_inner()))
}

fn flush_pending(db: &Database, pending: &Mutex<Vec<PreparedCommit>>) {
    db.submit(take_pending(pending));
}

#[napi]
impl NativeDatabase {
    /// Opens the file or joins the core already open in this process. The handle is closed
    /// when this thread's environment goes away (a terminated worker), releasing its locks.
    #[napi(catch_unwind, factory)]
    pub fn open(env: Env, path: String, options: NativeOpenOptions) -> Result<NativeDatabase> {
        let db = OpenPlan::new(path, options).open().or_js()?;
        NativeDatabase::attach(&env, db)
    }
}

impl NativeDatabase {
    /// The handle of an opened store, on this thread: its mailbox, and its closing when this
    /// thread's environment goes away.
    fn attach(env: &Env, db: Database) -> Result<NativeDatabase> {
        let mailbox = Mailbox::new(env)?;
        let cleanup = env.add_env_cleanup_hook(db.clone(), |db| db.close())?;
        Ok(NativeDatabase {
            db,
            mailbox,
            pending: Arc::new(Mutex::new(Vec::new())),
            cleanup: Some(cleanup),
        })
    }
}

#[napi]
impl NativeDatabase {
    #[napi(catch_unwind)]
    pub fn map_store(&self, name: String, options: NativeMapOptions) -> Result<NativeMapStore> {
        let defaults = MapOptions::default();
        let keys = KeyFormat::new(
            options
                .key_width
                .map_or(defaults.keys.width, |w| w as usize),
            options.key_base.unwrap_or(defaults.keys.base),
        )
        .or_js()?;
        let map = self
            .db
            .map_store(
                &name,
                MapOptions {
                    codec: options.codec,
                    cache_capacity: options
                        .cache_capacity
                        .map_or(defaults.cache_capacity, |c| c as usize),
                    cache_bytes: options
                        .cache_bytes
                        .map_or(defaults.cache_bytes, |b| b as usize),
                    keys,
                    bandwidth: options.bandwidth.map_or(defaults.bandwidth, |b| b as u64),
                },
            )
            .or_js()?;
        Ok(NativeMapStore {
            db: self.db.clone(),
            map,
            mailbox: self.mailbox.clone(),
            pending: self.pending.clone(),
            view: Arc::new(View::default()),
        })
    }

    /// Milliseconds redb spent repairing the file when this handle opened it after an unclean
    /// shutdown; null when no repair was needed (or another handle had it open already).
    #[napi(getter)]
    pub fn repair_ms(&self) -> Option<f64> {
        self.db.repaired().map(|d| d.as_secs_f64() * 1000.0)
    }

    /// The file's path, or the cluster URL.
    #[napi(getter)]
    pub fn path(&self) -> String {
        self.db.location()
    }

    /// Resolves once this handle's reads see everything committed anywhere before the call
    /// (at once for a file; for a cluster, once its replica caught up).
    #[napi(catch_unwind, ts_return_type = "Promise<void>")]
    pub fn sync(&self, env: Env) -> Result<PromiseRaw<'static, ()>> {
        let (deferred, raw) = self.mailbox.promise(&env)?;
        let once = SettleOnce::new(&self.mailbox, deferred);
        self.db.sync_with(once.callback(Settlement::Committed));
        Ok(PromiseRaw::new(env.raw(), raw))
    }

    /// Queues the commits made since the last flush, as one unit (call once per JS turn).
    /// Non-durable commits are written right here when the writer is idle (no fsync to wait
    /// for), and their promises settled at once: no thread hand-off, no wake-up.
    #[napi(catch_unwind)]
    pub fn flush(&self, env: Env) {
        if self.db.is_durable() {
            flush_pending(&self.db, &self.pending);
            return;
        }
        if self.db.write_now(take_pending(&self.pending)) {
            self.mailbox.drain(env.raw());
        }
    }

    /// Prepares one commit of several held locks (`db.commit([...])`): the lock `tokens[i]` on
    /// `keys[i]` of `maps[i]` writes `records[i]` (null: a delete), all in one transaction or
    /// none; `flags` as for a single commit (updateOnly, holdLockOnFailure). Queued with this
    /// turn's other commits at the next `flush()`; refusals reject the promise.
    #[napi(catch_unwind, ts_return_type = "Promise<void>")]
    pub fn commit_group(
        &self,
        env: Env,
        maps: Vec<&NativeMapStore>,
        keys: Vec<String>,
        tokens: Vec<i64>,
        records: Vec<Option<Buffer>>,
        flags: u32,
    ) -> Result<PromiseRaw<'static, ()>> {
        let (deferred, raw) = self.mailbox.promise(&env)?;
        let once = SettleOnce::new(&self.mailbox, deferred);
        let options = CommitOptions {
            update_only: flags & COMMIT_UPDATE_ONLY != 0,
            hold_lock_on_failure: flags & COMMIT_HOLD_ON_FAILURE != 0,
        };
        if maps.len() != keys.len() || keys.len() != tokens.len() || tokens.len() != records.len() {
            let err = kvstore_core::Error::invalid("commitGroup: the item arrays differ in length");
            once.refuse(Settlement::Committed, err);
            return Ok(PromiseRaw::new(env.raw(), raw));
        }
        let items = maps
            .iter()
            .zip(keys)
            .zip(tokens)
            .zip(records)
            .map(|(((map, key), token), record)| {
                let change = match record {
                    Some(bytes) => Change::Put(Arc::from(&bytes[..])),
                    None => Change::Delete,
                };
                (map.map.clone(), key, token as u64, change)
            })
            .collect();
        match self
            .db
            .prepare_group(items, options, once.callback(Settlement::Committed))
        {
            Ok(prepared) => self
                .pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(prepared),
            Err(err) => once.refuse(Settlement::Committed, err),
        }
        Ok(PromiseRaw::new(env.raw(), raw))
    }

    /// A consistent copy of the whole file at `dest`, made on a thread of its own.
    #[napi(catch_unwind, ts_return_type = "Promise<void>")]
    pub fn backup(&self, env: Env, dest: String) -> Result<PromiseRaw<'static, ()>> {
        // The snapshot is taken now, so closing the store meanwhile does not stop the copy.
        let backup = self.db.begin_backup(&dest).or_js()?;
        let (deferred, raw) = self.mailbox.promise(&env)?;
        let mailbox = self.mailbox.clone();
        std::thread::Builder::new()
            .name("kvstore-backup".into())
            .spawn(move || mailbox.post(Settlement::Committed(deferred, backup.run())))
            .map_err(|e| Error::from_reason(e.to_string()))?;
        Ok(PromiseRaw::new(env.raw(), raw))
    }

    /// Compacts the file after the commits queued so far; true if space was reclaimed.
    #[napi(catch_unwind, ts_return_type = "Promise<boolean>")]
    pub fn compact(&self, env: Env) -> Result<PromiseRaw<'static, bool>> {
        flush_pending(&self.db, &self.pending);
        let (deferred, raw) = self.mailbox.promise(&env)?;
        let once = SettleOnce::new(&self.mailbox, deferred);
        if let Err(err) = self.db.compact_with(once.callback(Settlement::Flag)) {
            once.refuse(Settlement::Flag, err);
        }
        Ok(PromiseRaw::new(env.raw(), raw))
    }

    /// The maps of this file with the codec each was created with.
    #[napi(catch_unwind)]
    pub fn tables(&self) -> Result<Vec<NativeTableInfo>> {
        Ok(self
            .db
            .tables()
            .or_js()?
            .into_iter()
            .map(|(name, codec)| NativeTableInfo { name, codec })
            .collect())
    }

    /// Waits for this handle's commits in flight, then releases its locks and waiters; on a
    /// thread of libuv's pool, since that takes round trips for a cluster (seconds while it is
    /// down) and a final fsync for a file. The promise settles after every commit promise of
    /// this handle. Rejects when this was the file's last handle and its final sync failed:
    /// acknowledged non-durable commits were lost (the handle is closed all the same).
    #[napi(catch_unwind, ts_return_type = "Promise<void>")]
    pub fn close(&mut self) -> AsyncTask<CloseTask> {
        // This turn's commits go in before the close, which then waits for them.
        flush_pending(&self.db, &self.pending);
        AsyncTask::new(CloseTask {
            db: self.db.clone(),
            mailbox: self.mailbox.clone(),
            cleanup: self.cleanup.take().map(CloseHook),
        })
    }
}

/// The hook that closes a handle when its thread's environment goes away; removed by the
/// close that finished first.
struct CloseHook(CleanupEnvHook<Database>);

// SAFETY: the hook only rides along with its close task; it is removed in `resolve`, on the JS
// thread that added it.
unsafe impl Send for CloseHook {}

/// `NativeDatabase.close`: the core's close runs on libuv's pool; the mailbox and the cleanup
/// hook are let go of afterwards, on the JS thread.
pub struct CloseTask {
    db: Database,
    mailbox: Arc<Mailbox>,
    cleanup: Option<CloseHook>,
}

impl Task for CloseTask {
    type Output = kvstore_core::Result<()>;
    type JsValue = ();

    fn compute(&mut self) -> Result<kvstore_core::Result<()>> {
        Ok(self.db.try_close())
    }

    fn resolve(&mut self, env: Env, closed: kvstore_core::Result<()>) -> Result<()> {
        // The core settled this handle's commits before its close returned: they are queued
        // in the mailbox and settled here, before the close's own promise.
        self.mailbox.close(&env);
        if let Some(CloseHook(hook)) = self.cleanup.take() {
            env.remove_env_cleanup_hook(hook)?;
        }
        closed.or_js()
    }
}

impl Drop for NativeDatabase {
    fn drop(&mut self) {
        // Nothing prepared may be left unsettled: its promise would keep the loop alive.
        flush_pending(&self.db, &self.pending);
    }
}

#[napi(object)]
pub struct NativeLocked {
    pub token: i64,
    pub existed: bool,
    pub record: Option<Buffer>,
}

pub(crate) fn to_js_locked(locked: LockedEntry) -> NativeLocked {
    NativeLocked {
        token: locked.token as i64,
        existed: locked.existed,
        record: locked.record.map(|r| Buffer::from(r.to_vec())),
    }
}

fn lock_mode(mode: u32) -> Result<LockMode> {
    match mode {
        0 => Ok(LockMode::Existing),
        1 => Ok(LockMode::New),
        2 => Ok(LockMode::Any),
        _ => Err(js_error(kvstore_core::Error::invalid("unknown lock mode"))),
    }
}

/// Writes a lock's committed record into `out` after a 4-byte little-endian length, -1 when
/// there is none. False when it does not fit.
fn copy_locked_record(record: Option<&[u8]>, out: &mut [u8]) -> bool {
    let length = match record.map(|r| i32::try_from(r.len())) {
        None => -1,
        Some(Ok(length)) => length,
        Some(Err(_)) => return false,
    };
    let body = record.unwrap_or_default();
    match out.get_mut(..4 + body.len()) {
        Some(target) => {
            target[..4].copy_from_slice(&length.to_le_bytes());
            target[4..].copy_from_slice(body);
            true
        }
        None => false,
    }
}

/// Prepared commits of one turn that are queued at once rather than at the turn's end.
const EAGER_FLUSH: usize = 16;

const COMMIT_DELETE: u32 = 1;
const COMMIT_UPDATE_ONLY: u32 = 2;
const COMMIT_HOLD_ON_FAILURE: u32 = 4;

#[napi(object)]
pub struct NativeRangeOptions {
    pub prefix: Option<String>,
    pub start: Option<String>,
    pub stop: Option<String>,
    pub reverse: Option<bool>,
    pub limit: Option<f64>,
    pub keys_only: Option<bool>,
}

fn range_options(options: &NativeRangeOptions) -> RangeOptions {
    RangeOptions {
        prefix: options.prefix.clone(),
        start: options.start.clone(),
        stop: options.stop.clone(),
        reverse: options.reverse.unwrap_or(false),
        limit: options.limit.filter(|l| l.is_finite()).map(|l| l as u64),
    }
}

#[napi(object)]
pub struct NativeStats {
    pub entries: f64,
    pub file_bytes: f64,
    pub cache_hits: f64,
    pub cache_misses: f64,
    pub cache_entries: f64,
    pub cache_bytes: f64,
    pub locks_held: f64,
    pub locks_waiting: f64,
    pub commits: f64,
    pub batches: f64,
    pub failed_batches: f64,
    pub largest_batch: f64,
    pub unsynced_batches: f64,
    /// etcd: the replica's revision, and how many revisions it may be behind.
    pub replica_revision: Option<f64>,
    pub replica_lag: Option<f64>,
    /// Watches of this map open in the process.
    pub watchers: f64,
}

#[napi]
pub struct NativeMapStore {
    db: Database,
    map: MapStore,
    mailbox: Arc<Mailbox>,
    pending: Arc<Mutex<Vec<PreparedCommit>>>,
    view: Arc<View>,
}

/// One `db.mapStore()` view of a map. Closing it rejects the lock waits queued through it; a
/// grant on its way when it closed is released, never handed out.
#[derive(Default)]
pub(crate) struct View {
    closed: AtomicBool,
    /// Tickets of the waits queued through this view and not yet settled.
    waits: Mutex<HashSet<u64>>,
    /// Watches opened through this view: closing it ends them.
    watches: Mutex<Vec<Weak<WatchState>>>,
}

impl View {
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    fn waits(&self) -> std::sync::MutexGuard<'_, HashSet<u64>> {
        self.waits.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn watches(&self) -> std::sync::MutexGuard<'_, Vec<Weak<WatchState>>> {
        self.watches.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Lock-wait tickets, unique for the life of the process (the core refuses a ticket that is
/// already queued: a cancel must reach exactly its own waiter).
static NEXT_TICKET: AtomicU64 = AtomicU64::new(1);

#[napi]
impl NativeMapStore {
    /// Takes `key`'s lock for `mode` (0 existing, 1 new, 2 either). Returns the locked entry at
    /// once when the key is free; otherwise a promise, and the wait's ticket (for `cancelWait`)
    /// in the first 8 bytes of `out`, a float64 little-endian.
    /// A lock granted at once comes back as the bare token, and the committed record is copied
    /// into `out` after a 4-byte little-endian length (-1: no record): building a JS object and
    /// an external buffer through N-API costs more than the lock itself. Only a record too
    /// long for `out` comes back as a `NativeLocked`.
    #[napi(
        catch_unwind,
        ts_return_type = "number | NativeLocked | Promise<NativeLocked>"
    )]
    pub fn lock(
        &self,
        env: Env,
        key: String,
        mode: u32,
        mut out: BufferSlice,
    ) -> Result<Either3<i64, NativeLocked, PromiseRaw<'static, NativeLocked>>> {
        let mode = lock_mode(mode)?;
        if self.view.is_closed() {
            return Err(js_error(kvstore_core::Error::StoreClosed));
        }
        if out.len() < 8 {
            return Err(js_error(kvstore_core::Error::invalid(
                "the lock buffer must hold at least 8 bytes",
            )));
        }
        let ticket = NEXT_TICKET.fetch_add(1, Ordering::Relaxed);
        let mut promise = None;
        let acquired = self.map.acquire(&key, ticket, || {
            let (deferred, raw) = self
                .mailbox
                .promise(&env)
                .map_err(|e| kvstore_core::Error::invalid(e.to_string()))?;
            promise = Some(PromiseRaw::new(env.raw(), raw));
            let map = self.map.clone();
            let key = key.clone();
            let mailbox = self.mailbox.clone();
            let view = self.view.clone();
            view.waits().insert(ticket);
            Ok(Box::new(move |outcome: kvstore_core::Result<Grant>| {
                view.waits().remove(&ticket);
                mailbox.post(match outcome {
                    Ok(grant) => Settlement::Granted(
                        deferred,
                        PendingGrant {
                            map,
                            key,
                            grant: Some(grant),
                            view,
                        },
                        mode,
                    ),
                    Err(err) => Settlement::NotGranted(deferred, err),
                })
            }))
        });
        match acquired.or_js()? {
            Acquire::Granted(grant) => {
                let locked = self.map.finish_acquire(&key, grant, mode).or_js()?;
                Ok(if copy_locked_record(locked.record.as_deref(), &mut out) {
                    Either3::A(locked.token as i64)
                } else {
                    Either3::B(to_js_locked(locked))
                })
            }
            Acquire::Queued => {
                out[..8].copy_from_slice(&(ticket as f64).to_le_bytes());
                Ok(Either3::C(promise.expect("queued with a promise")))
            }
        }
    }

    /// Gives up a queued wait; `reason` is "timeout" or "abort". False if already granted.
    #[napi(catch_unwind)]
    pub fn cancel_wait(&self, key: String, ticket: f64, reason: String) -> bool {
        let reason = match reason.as_str() {
            "abort" => kvstore_core::Error::Aborted,
            _ => kvstore_core::Error::LockTimeout { key },
        };
        self.map.cancel_wait(ticket as u64, reason)
    }

    #[napi(catch_unwind)]
    pub fn release(&self, key: String, token: i64) -> Result<()> {
        self.map.release(&key, token as u64).or_js()
    }

    /// Whether the lock `token` on `key` is still held (closing its handle frees it).
    #[napi(catch_unwind)]
    pub fn holds(&self, key: String, token: i64) -> bool {
        self.map.holds(&key, token as u64)
    }

    /// Closes this view: its queued lock waits are rejected with `StoreClosedError`, and no
    /// lock is handed out through it any more. Locks it holds stay held until released.
    #[napi(catch_unwind)]
    pub fn close(&self) {
        if self.view.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        let waits: Vec<u64> = self.view.waits().drain().collect();
        for ticket in waits {
            self.map
                .cancel_wait(ticket, kvstore_core::Error::StoreClosed);
        }
        let watches: Vec<_> = self.view.watches().drain(..).collect();
        for watch in watches.iter().filter_map(Weak::upgrade) {
            watch.watcher.close();
        }
    }

    /// Starts a watch of this map's commits from now on (see `NativeWatcher`).
    #[napi(catch_unwind)]
    pub fn watch(&self, options: NativeWatchOptions) -> Result<NativeWatcher> {
        if self.view.is_closed() {
            return Err(js_error(kvstore_core::Error::StoreClosed));
        }
        let defaults = WatchOptions::default();
        let high_water_mark = match options.high_water_mark {
            None => defaults.high_water_mark,
            Some(n) if n >= 1.0 && n.fract() == 0.0 && n <= usize::MAX as f64 => n as usize,
            Some(n) => {
                return Err(js_error(kvstore_core::Error::invalid(format!(
                    "highWaterMark must be a positive integer, got {n}"
                ))))
            }
        };
        let watcher = self
            .map
            .watch(&WatchOptions {
                prefix: options.prefix,
                high_water_mark,
            })
            .or_js()?;
        let state = Arc::new(WatchState {
            watcher,
            waiting: AtomicBool::new(false),
        });
        {
            let mut watches = self.view.watches();
            watches.retain(|w| w.strong_count() > 0);
            watches.push(Arc::downgrade(&state));
        }
        if self.view.is_closed() {
            // The view closed meanwhile and may not have seen this watch.
            state.watcher.close();
        }
        Ok(NativeWatcher {
            state,
            mailbox: self.mailbox.clone(),
        })
    }

    /// Prepares a write of `record` (or a delete, per `flags`) under the lock `token`; it is
    /// queued at the next `flush()` of its database and settles once durable.
    #[napi(catch_unwind, ts_return_type = "Promise<void>")]
    pub fn commit(
        &self,
        env: Env,
        key: String,
        token: i64,
        record: Option<&[u8]>,
        flags: u32,
    ) -> Result<PromiseRaw<'static, ()>> {
        let change = match record {
            Some(bytes) if flags & COMMIT_DELETE == 0 => Change::Put(Arc::from(bytes)),
            _ => Change::Delete,
        };
        let options = CommitOptions {
            update_only: flags & COMMIT_UPDATE_ONLY != 0,
            hold_lock_on_failure: flags & COMMIT_HOLD_ON_FAILURE != 0,
        };
        // A commit refused before queueing (released lock, bad options) rejects the same way.
        let (deferred, raw) = self.mailbox.promise(&env)?;
        let once = SettleOnce::new(&self.mailbox, deferred);
        let prepared = self.map.prepare_commit(
            &key,
            token as u64,
            change,
            options,
            once.callback(Settlement::Committed),
        );
        match prepared {
            Ok(prepared) => {
                let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
                pending.push(prepared);
                // Enough for a transaction of its own: hand it to the writer now, so writing
                // overlaps with the rest of this turn. Not when durable: there the fsync is the
                // cost, and the whole turn's commits should share one.
                if pending.len() >= EAGER_FLUSH && !self.db.is_durable() {
                    self.db.submit(std::mem::take(&mut *pending));
                }
            }
            Err(err) => once.refuse(Settlement::Committed, err),
        }
        Ok(PromiseRaw::new(env.raw(), raw))
    }

    /// Copies the committed record of `key` into `out` and returns its length, or -1 when there
    /// is no such entry. A record longer than `out` is not copied: the caller grows `out` to the
    /// returned length and asks again. Reusing one buffer spares a buffer allocation per read,
    /// which costs more than the lookup itself.
    #[napi(catch_unwind)]
    pub fn get_into(&self, key: String, mut out: BufferSlice) -> Result<i64> {
        match self.map.get(&key).or_js()? {
            Some(record) => {
                if let Some(target) = out.get_mut(..record.len()) {
                    target.copy_from_slice(&record);
                }
                Ok(record.len() as i64)
            }
            None => Ok(-1),
        }
    }

    #[napi(catch_unwind, ts_return_type = "string | Promise<string>")]
    pub fn next_key(&self, env: Env) -> Result<Either<String, PromiseRaw<'static, String>>> {
        let mut promise = None;
        let mut failure = None;
        let next = self.map.next_key(|| match self.mailbox.promise(&env) {
            Ok((deferred, raw)) => {
                promise = Some(PromiseRaw::new(env.raw(), raw));
                let mailbox = self.mailbox.clone();
                Box::new(move |outcome: kvstore_core::Result<String>| {
                    mailbox.post(Settlement::Key(deferred, outcome))
                })
            }
            Err(err) => {
                failure = Some(err);
                // Without a promise there is nobody to tell; the number is simply skipped.
                Box::new(|_| {})
            }
        });
        if let Some(err) = failure {
            return Err(err);
        }
        match next.or_js()? {
            NextKey::Ready(key) => Ok(Either::A(key)),
            NextKey::Pending => promise
                .map(Either::B)
                .ok_or_else(|| Error::from_reason("could not create a promise")),
        }
    }

    #[napi(catch_unwind)]
    pub fn range(&self, options: NativeRangeOptions) -> Result<NativeRange> {
        let inner = self.map.range(&range_options(&options)).or_js()?;
        Ok(NativeRange {
            inner: Some(inner),
            keys_only: options.keys_only.unwrap_or(false),
            failed: None,
        })
    }

    #[napi(catch_unwind)]
    pub fn count(&self, options: NativeRangeOptions) -> Result<f64> {
        Ok(self.map.count(&range_options(&options)).or_js()? as f64)
    }

    #[napi(catch_unwind)]
    pub fn stats(&self) -> Result<NativeStats> {
        let s = self.map.stats().or_js()?;
        Ok(NativeStats {
            entries: s.entries as f64,
            file_bytes: s.file_bytes as f64,
            cache_hits: s.cache_hits as f64,
            cache_misses: s.cache_misses as f64,
            cache_entries: s.cache_entries as f64,
            cache_bytes: s.cache_bytes as f64,
            locks_held: s.locks_held as f64,
            locks_waiting: s.locks_waiting as f64,
            commits: s.commits as f64,
            batches: s.batches as f64,
            failed_batches: s.failed_batches as f64,
            largest_batch: s.largest_batch as f64,
            unsynced_batches: s.unsynced_batches as f64,
            replica_revision: s.replica_revision.map(|r| r as f64),
            replica_lag: s.replica_lag.map(|r| r as f64),
            watchers: s.watchers as f64,
        })
    }
}

#[napi(object)]
pub struct NativeWatchOptions {
    pub prefix: Option<String>,
    pub high_water_mark: Option<f64>,
}

/// A watch and whether a `next()` promise waits on it.
pub(crate) struct WatchState {
    pub(crate) watcher: Watcher,
    pub(crate) waiting: AtomicBool,
}

/// Changes handed to JS per `next()`.
const WATCH_BATCH: usize = 1024;

/// Packs changes as `u32le keyLength, key, i32le recordLength (-1: deleted), record` each.
pub(crate) fn pack_events(events: &[WatchEvent]) -> Vec<u8> {
    let size: usize = events
        .iter()
        .map(|e| 8 + e.key.len() + e.record.as_ref().map_or(0, |r| r.len()))
        .sum();
    let mut out = Vec::with_capacity(size);
    for event in events {
        out.extend_from_slice(&(event.key.len() as u32).to_le_bytes());
        out.extend_from_slice(event.key.as_bytes());
        match &event.record {
            Some(record) => {
                out.extend_from_slice(&(record.len() as i32).to_le_bytes());
                out.extend_from_slice(record);
            }
            None => out.extend_from_slice(&(-1i32).to_le_bytes()),
        }
    }
    out
}

/// One watch of a map: `next()` hands over the changes committed since the last call, packed
/// (see `pack_events`), at once when there are; otherwise a promise settled through the
/// mailbox when the core wakes it — no polling. Null once the watch ended (closed: `close()`,
/// its view or database closed); a failure (an overflow) is thrown once, then null.
#[napi]
pub struct NativeWatcher {
    state: Arc<WatchState>,
    mailbox: Arc<Mailbox>,
}

#[napi]
impl NativeWatcher {
    #[napi(
        catch_unwind,
        ts_return_type = "Buffer | null | Promise<Buffer | null>"
    )]
    pub fn next<'env>(
        &self,
        env: &'env Env,
    ) -> Result<Either3<BufferSlice<'env>, Null, PromiseRaw<'static, Option<Buffer>>>> {
        let state = &self.state;
        if state.waiting.load(Ordering::SeqCst) {
            return Err(js_error(kvstore_core::Error::invalid(
                "a watch is read one next() at a time",
            )));
        }
        match state.watcher.try_next(WATCH_BATCH) {
            WatchNext::Changes(events) => {
                return Ok(Either3::A(BufferSlice::copy_from(
                    env,
                    pack_events(&events),
                )?))
            }
            WatchNext::Ended => return Ok(Either3::B(Null)),
            WatchNext::Failed(err) => return Err(js_error(err)),
            WatchNext::Pending => {}
        }
        let (deferred, raw) = match self.mailbox.promise(env) {
            Ok(made) => made,
            // The database closed: its watches ended with it.
            Err(_) => return Ok(Either3::B(Null)),
        };
        state.waiting.store(true, Ordering::SeqCst);
        let mailbox = self.mailbox.clone();
        let woken = self.state.clone();
        // Called at once if something came between the two looks.
        state.watcher.wake_when_ready(Box::new(move || {
            mailbox.post(Settlement::Watch(deferred, woken))
        }));
        Ok(Either3::C(PromiseRaw::new(env.raw(), raw)))
    }

    /// Ends the watch and frees what it held; a pending `next()` resolves null. Idempotent.
    #[napi(catch_unwind)]
    pub fn close(&self) {
        self.state.watcher.close();
    }
}

/// A walk over one snapshot. Entries come out in batches packed into one buffer:
/// `u32le keyLength, key, [u32le recordLength, record]` per entry (no record when keysOnly).
#[napi]
pub struct NativeRange {
    inner: Option<EntryRange>,
    keys_only: bool,
    /// The step that ended the walk failed after a batch had entries: reported by the next
    /// call, so every entry before the failure comes through.
    failed: Option<kvstore_core::Error>,
}

/// Bytes after which a batch is cut even if `max_items` is not reached.
const BATCH_BYTES: usize = 1 << 20;

#[napi]
impl NativeRange {
    /// Up to `max_items` entries, or null at the end (the snapshot is then freed). A failed
    /// step ends the walk with its error, after the entries before it.
    #[napi(catch_unwind)]
    pub fn next_batch<'env>(
        &mut self,
        env: &'env Env,
        max_items: u32,
    ) -> Result<Option<BufferSlice<'env>>> {
        if let Some(err) = self.failed.take() {
            return Err(js_error(err));
        }
        let Some(inner) = self.inner.as_mut() else {
            return Ok(None);
        };
        let mut out = Vec::with_capacity(16 * 1024);
        let mut count = 0;
        while count < max_items && out.len() < BATCH_BYTES {
            match inner.next() {
                Some(Ok(entry)) => {
                    let key = entry.key().as_bytes();
                    out.extend_from_slice(&(key.len() as u32).to_le_bytes());
                    out.extend_from_slice(key);
                    if !self.keys_only {
                        let record = entry.record();
                        out.extend_from_slice(&(record.len() as u32).to_le_bytes());
                        out.extend_from_slice(record);
                    }
                    count += 1;
                }
                Some(Err(err)) => {
                    self.inner = None;
                    if count == 0 {
                        return Err(js_error(err));
                    }
                    self.failed = Some(err);
                    break;
                }
                None => {
                    self.inner = None;
                    break;
                }
            }
        }
        if count == 0 {
            return Ok(None);
        }
        // A copy into memory V8 manages: an external buffer is invisible to the garbage
        // collector's accounting, so a long walk would pile up batches before any GC ran.
        Ok(Some(BufferSlice::copy_from(env, &out)?))
    }

    /// Frees the snapshot now rather than at garbage collection.
    #[napi(catch_unwind)]
    pub fn close(&mut self) {
        self.inner = None;
    }
}
