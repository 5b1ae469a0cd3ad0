//! The single writer of a file. Every pending commit, from every thread, joins the next write
//! transaction: one transaction and (when durable) one fsync for the whole batch. Only after the
//! transaction is durable does the writer update the cache, hand on the locks and settle each
//! caller, in that order.

use std::borrow::Cow;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use redb::{Durability, TableHandle};

use crate::cache::Cached;
use crate::error::{from_redb, Error, Result};
use crate::file::storage::{
    StoreFile, TableState, FORMAT_KEY, FORMAT_VERSION, FORMAT_WITH_LOG, META_TABLE,
};
use crate::file::wal::{self, Appended, Log, Op, WAL_KEY};
use crate::locks::LockToken;
use crate::map::{Change, CommitCallback};
use crate::watch::WatchHub;

/// Most commits that share one transaction; bounds the latency of the first in a batch.
const MAX_BATCH: usize = 8192;

pub(crate) struct CommitJob {
    pub table: Arc<TableState>,
    pub key: Box<str>,
    pub token: LockToken,
    pub change: Change,
    /// Hand the lock on after a successful write (false for `updateOnly`).
    pub release: bool,
    /// Keep the lock when the write fails, so the caller can retry.
    pub hold_on_failure: bool,
    pub durable: bool,
    pub done: CommitCallback,
}

/// One lock's change in a [`GroupJob`].
pub(crate) struct GroupPart {
    pub table: Arc<TableState>,
    pub key: Box<str>,
    pub token: LockToken,
    pub change: Change,
}

/// A commit of several held locks (`db.commit([a, b])`): one job, so the writer never splits it
/// across transactions; every part is written or none, and `done` hears once.
pub(crate) struct GroupJob {
    pub parts: Vec<GroupPart>,
    /// Hand every lock on after a successful write (false for `updateOnly`).
    pub release: bool,
    /// Keep every lock when the write fails.
    pub hold_on_failure: bool,
    pub durable: bool,
    pub done: CommitCallback,
}

pub(crate) enum Job {
    Commit(CommitJob),
    /// Several locks' changes, written in one transaction, all or none.
    Group(GroupJob),
    Lease {
        table: Arc<TableState>,
        until: u64,
        durable: bool,
    },
    /// Runs once every job submitted before it is settled.
    Barrier(Box<dyn FnOnce() + Send>),
    /// Several jobs sent as one message, so they land in the same transaction.
    Many(Vec<Job>),
    /// Nothing to write: the idle writer looks again at when unsynced commits fall due.
    Wake,
    Shutdown,
}

impl Job {
    /// The entries this job writes: (table, key, change); none for bookkeeping jobs.
    pub(crate) fn changes(&self) -> Vec<(&Arc<TableState>, &str, &Change)> {
        match self {
            Job::Commit(c) => vec![(&c.table, &*c.key, &c.change)],
            Job::Group(g) => g
                .parts
                .iter()
                .map(|p| (&p.table, &*p.key, &p.change))
                .collect(),
            _ => Vec::new(),
        }
    }
}

/// Counters for `stats()`: `commits / batches` is how many commits shared each transaction.
#[derive(Default)]
pub struct CommitStats {
    pub commits: AtomicU64,
    pub batches: AtomicU64,
    pub failed_batches: AtomicU64,
    pub largest_batch: AtomicU64,
    /// Non-durable transactions written since the last durable one (lost by a crash now).
    pub unsynced_batches: AtomicU64,
}

thread_local! {
    /// The queue whose batch this thread is writing (0: none): its writer thread, or a caller
    /// writing a batch inline. Callbacks of that batch run here.
    static ON_WRITER: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

static NEXT_QUEUE: AtomicU64 = AtomicU64::new(1);

/// The queue whose batch the current thread is writing, if any (0: none).
pub(crate) fn current_writer() -> u64 {
    ON_WRITER.with(|on| on.get())
}

pub(crate) struct CommitQueue {
    /// Names this queue for [`current_writer`].
    id: u64,
    tx: mpsc::Sender<Job>,
    /// The writer; it returns the outcome of its final sync.
    thread: Mutex<Option<JoinHandle<Result<()>>>>,
    /// The writer's state: the writer thread holds it while it writes a batch, and so does a
    /// caller that writes its own batch inline (see [`CommitQueue::write_inline`]).
    writer: Arc<Mutex<Writer>>,
    /// Set once shutdown is requested: no more inline writes.
    stopping: Arc<AtomicBool>,
    pub stats: Arc<CommitStats>,
    /// The watches of this file's maps: the writer publishes each written batch to them.
    pub watchers: Arc<WatchHub>,
}

impl CommitQueue {
    /// Starts the writer. Non-durable commits are made durable within `sync_interval` of the
    /// first of them, by the next transaction or, when none comes, by the idle writer.
    /// With a `log`, durable batches are made durable by it and redb is checkpointed.
    pub fn start(file: Arc<StoreFile>, sync_interval: Duration, log: Option<Log>) -> Result<Self> {
        let (tx, rx) = mpsc::channel();
        let id = NEXT_QUEUE.fetch_add(1, Ordering::Relaxed);
        let stats = Arc::new(CommitStats::default());
        let watchers = Arc::new(WatchHub::default());
        let writer = Arc::new(Mutex::new(Writer {
            file,
            stats: stats.clone(),
            watchers: watchers.clone(),
            unsynced_since: None,
            sync_interval,
            broken: false,
            retry: Retry::default(),
            log,
        }));
        let shared = writer.clone();
        let thread = std::thread::Builder::new()
            .name("kvstore-writer".into())
            .spawn(move || run(id, &shared, rx))?;
        Ok(CommitQueue {
            id,
            tx,
            thread: Mutex::new(Some(thread)),
            writer,
            stopping: Arc::new(AtomicBool::new(false)),
            stats,
            watchers,
        })
    }

    /// Writes `jobs` as one transaction on the calling thread when the writer is idle, and
    /// settles them before returning; otherwise queues them for the writer. This saves two
    /// thread hand-offs per batch: worth it for non-durable batches and for callers that block
    /// until their commit settles anyway. Returns whether the batch was written inline.
    pub fn write_inline(&self, jobs: Vec<Job>) -> bool {
        let idle = if self.stopping.load(Ordering::SeqCst) {
            None
        } else {
            self.writer.try_lock().ok()
        };
        // A batch due to make earlier commits durable goes to the writer: its fsync must not
        // hold up the caller.
        let Some(mut writer) = idle.filter(|w| !w.sync_due()) else {
            self.submit(Job::Many(jobs));
            return false;
        };
        // Callbacks run here as on the writer thread: code in them must not wait for it.
        if self.stopping.load(Ordering::SeqCst) {
            // Shutdown came between the check above and the lock: the writer has the rest.
            drop(writer);
            self.submit(Job::Many(jobs));
            return false;
        }
        let was_writer = ON_WRITER.with(|on| on.replace(self.id));
        let was_unsynced = writer.unsynced_since.is_some();
        let was_broken = writer.broken;
        let carry = writer.commit_batch(jobs);
        // The writer may be asleep with nothing due: it must sync these in time, and retry the
        // reopen of a file this batch broke.
        let wake =
            (!was_unsynced && writer.unsynced_since.is_some()) || (!was_broken && writer.broken);
        drop(writer);
        if wake {
            let _ = self.tx.send(Job::Wake);
        }
        ON_WRITER.with(|on| on.set(was_writer));
        if !carry.is_empty() {
            self.submit(Job::Many(carry));
        }
        true
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    /// Whether this thread is writing one of this queue's batches (so its callbacks run here):
    /// code that waits for this queue's writer must not run now.
    pub fn is_current_writer(&self) -> bool {
        current_writer() == self.id
    }

    pub fn submit(&self, job: Job) {
        if let Err(mpsc::SendError(job)) = self.tx.send(job) {
            fail_job(job, &Error::StoreClosed);
        }
    }

    /// Lets the writer finish what is queued, make it durable, and stop. Fails when the final
    /// sync did: the non-durable commits since the last sync are lost.
    pub fn shutdown(&self) -> Result<()> {
        self.stopping.store(true, Ordering::SeqCst);
        let _ = self.tx.send(Job::Shutdown);
        if self.is_current_writer() {
            // The writer stops by itself after the shutdown job; it cannot join itself.
            return Ok(());
        }
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        match thread.map(|t| t.join()) {
            Some(Ok(outcome)) => outcome,
            _ => Ok(()),
        }
    }
}

struct Writer {
    file: Arc<StoreFile>,
    stats: Arc<CommitStats>,
    watchers: Arc<WatchHub>,
    /// When the first non-durable transaction since the last durable one was written.
    unsynced_since: Option<Instant>,
    sync_interval: Duration,
    /// The last write failed: redb refuses further writes until the file is reopened.
    broken: bool,
    /// When the idle writer next tries to reopen a broken file that holds unsynced commits.
    retry: Retry,
    /// The write-ahead log of a durable store (None: durable batches are durable redb commits).
    log: Option<Log>,
}

/// How a batch is written.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Acknowledged before it is durable (`durability: 'none'`): logged without a sync.
    Deferred,
    /// Durable before it is acknowledged: a synced log record, else a checkpoint.
    Durable,
    /// A durable redb commit: redb holds everything written so far; the log starts over.
    Checkpoint,
    /// The last checkpoint, at close: the log is retired.
    Final,
}

/// What a written batch cost.
struct Written {
    /// A durable redb commit: nothing before it needs the log any more.
    checkpoint: bool,
    /// Durable (through the log or redb): every batch before it is too.
    durable: bool,
}

/// Backoff for the idle writer's attempts to reopen a broken file: 10 ms, doubling to 5 s.
struct Retry {
    at: Option<Instant>,
    delay: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            at: None,
            delay: Self::FIRST,
        }
    }
}

impl Retry {
    const FIRST: Duration = Duration::from_millis(10);
    const LAST: Duration = Duration::from_secs(5);

    fn schedule(&mut self) {
        self.at = Some(Instant::now() + self.delay);
        self.delay = (self.delay * 2).min(Self::LAST);
    }

    fn reset(&mut self) {
        *self = Retry::default();
    }
}

fn lock_writer(writer: &Mutex<Writer>) -> std::sync::MutexGuard<'_, Writer> {
    writer.lock().unwrap_or_else(|p| p.into_inner())
}

/// The writer thread: batches whatever is queued into one transaction at a time.
fn run(id: u64, writer: &Mutex<Writer>, rx: mpsc::Receiver<Job>) -> Result<()> {
    ON_WRITER.with(|on| on.set(id));
    let mut carry: Vec<Job> = Vec::new();
    let mut stopping = false;
    while !stopping {
        let mut jobs = std::mem::take(&mut carry);
        if jobs.is_empty() {
            // Idle with commits not yet durable: wake when they are due, and sync them.
            let due_in = lock_writer(writer).sync_due_in();
            let next = match due_in {
                None => rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
                Some(wait) => rx.recv_timeout(wait),
            };
            match next {
                Ok(job) => push_job(&mut jobs, job),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    lock_writer(writer).sync_if_due();
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        while jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => push_job(&mut jobs, job),
                Err(_) => break,
            }
        }
        if jobs.is_empty() {
            continue; // woken only
        }
        if let Some(at) = jobs.iter().position(|j| matches!(j, Job::Shutdown)) {
            stopping = true;
            // Whatever arrived after the shutdown request is refused, not dropped silently.
            for late in jobs.drain(at..).skip(1) {
                fail_job(late, &Error::StoreClosed);
            }
        }
        if !jobs.is_empty() {
            carry = lock_writer(writer).commit_batch(jobs);
        }
    }
    // Follow-ups still due at shutdown (a lease): their waiters hear that the store closed.
    for job in carry {
        fail_job(job, &Error::StoreClosed);
    }
    lock_writer(writer).close()
}

impl Writer {
    /// How long until the unsynced transactions are due to be made durable (None: none are).
    /// A broken file is retried with backoff instead.
    fn sync_due_in(&self) -> Option<Duration> {
        let since = self.unsynced_since?;
        if self.broken {
            let at = self.retry.at?;
            return Some(at.saturating_duration_since(Instant::now()));
        }
        Some(self.sync_interval.saturating_sub(since.elapsed()))
    }

    fn sync_due(&self) -> bool {
        self.sync_due_in() == Some(Duration::ZERO)
    }

    /// The idle writer's sync: an empty durable transaction makes the earlier ones durable; on
    /// a broken file, reopening it writes them again (see [`StoreFile::recover`]).
    fn sync_if_due(&mut self) {
        if !self.sync_due() {
            return;
        }
        let outcome = if self.broken {
            self.recover()
        } else {
            self.write(&[], Mode::Checkpoint).map(drop)
        };
        match outcome {
            Ok(()) => self.synced(),
            Err(_) => self.broke(),
        }
    }

    /// Reopens the broken file; what non-durable commits acknowledged is written again.
    fn recover(&mut self) -> Result<()> {
        self.file.recover()?;
        self.broken = false;
        self.retry.reset();
        self.synced();
        Ok(())
    }

    fn broke(&mut self) {
        self.broken = true;
        self.retry.schedule();
    }

    fn synced(&mut self) {
        self.unsynced_since = None;
        self.stats.unsynced_batches.store(0, Ordering::Relaxed);
    }

    /// At shutdown: see [`Writer::finish`]; then the log file is closed.
    fn close(&mut self) -> Result<()> {
        let outcome = self.finish();
        self.log = None;
        outcome
    }

    /// Gives back the unused rest of each key lease and makes everything durable, reopening a
    /// broken file first. If that fails (the disk is still full), the non-durable commits since
    /// the last sync are lost with the instance: the error says so.
    fn finish(&mut self) -> Result<()> {
        let at_risk = self.stats.unsynced_batches.load(Ordering::Relaxed);
        let path = self.file.path().to_string();
        let lost = |err: Error| Error::Io {
            errno: match &err {
                Error::Io { errno, .. } => *errno,
                _ => None,
            },
            message: format!(
                "{at_risk} acknowledged non-durable transaction(s) of '{path}' could not be made \
                 durable at close and are lost: {err}"
            ),
        };
        // What the log holds is not at risk: the next open replays it.
        let unsynced = at_risk > 0;
        if self.broken {
            // Nothing acknowledged is at risk without unsynced commits: closing is fine.
            if let Err(err) = self.recover() {
                return if unsynced { Err(lost(err)) } else { Ok(()) };
            }
        }
        let leases: Vec<Job> = self
            .file
            .tables()
            .into_iter()
            .filter_map(|table| {
                let until = table.sequence().give_back()?;
                Some(Job::Lease {
                    table,
                    until,
                    durable: true,
                })
            })
            .collect();
        let retire = self.log.as_ref().is_some_and(Log::is_recorded);
        if self.unsynced_since.is_some() || !leases.is_empty() || retire {
            if let Err(err) = self.write(&leases, Mode::Final) {
                return if unsynced { Err(lost(err)) } else { Ok(()) };
            }
        }
        Ok(())
    }

    /// Writes one batch and settles it. Returns follow-up jobs (further key leases).
    fn commit_batch(&mut self, jobs: Vec<Job>) -> Vec<Job> {
        // A commit whose lock was taken from it meanwhile (its handle closed) fails alone.
        // A group fails whole when any of its locks was taken.
        let (jobs, stale): (Vec<Job>, Vec<Job>) =
            jobs.into_iter().partition(|job| lost_lock(job).is_none());
        for job in stale {
            if let Some(key) = lost_lock(&job) {
                let err = Error::LockReleased { key };
                fail_job(job, &err);
            }
        }
        if self.file.take_read_failure() {
            self.broken = true;
        }
        if self.broken {
            match self.recover() {
                Ok(()) => {}
                Err(err) => {
                    self.retry.schedule();
                    self.stats.failed_batches.fetch_add(1, Ordering::Relaxed);
                    for job in jobs {
                        fail_job(job, &err);
                    }
                    return Vec::new();
                }
            }
        }
        let durable = jobs.iter().any(|j| match j {
            Job::Commit(c) => c.durable,
            Job::Group(g) => g.durable,
            Job::Lease { durable, .. } => *durable,
            Job::Barrier(_) | Job::Many(_) | Job::Wake | Job::Shutdown => false,
        });
        let mode = if self.sync_due() {
            Mode::Checkpoint
        } else if durable {
            Mode::Durable
        } else {
            Mode::Deferred
        };
        let outcome = self.write(&jobs, mode);
        // A group is one commit.
        let commits = jobs
            .iter()
            .filter(|j| matches!(j, Job::Commit(_) | Job::Group(_)))
            .count() as u64;
        match outcome {
            Ok(written) => {
                if written.checkpoint {
                    self.synced();
                } else {
                    // redb is not durable: a checkpoint falls due within the sync interval.
                    self.unsynced_since.get_or_insert_with(Instant::now);
                    if written.durable {
                        self.stats.unsynced_batches.store(0, Ordering::Relaxed);
                    } else {
                        self.stats.unsynced_batches.fetch_add(1, Ordering::Relaxed);
                    }
                }
                self.stats.batches.fetch_add(1, Ordering::Relaxed);
                self.stats.commits.fetch_add(commits, Ordering::Relaxed);
                self.stats
                    .largest_batch
                    .fetch_max(commits, Ordering::Relaxed);
                let (barriers, jobs): (Vec<Job>, Vec<Job>) =
                    jobs.into_iter().partition(|j| matches!(j, Job::Barrier(_)));
                apply_to_caches(&jobs);
                // Watchers hear the batch before any of its callers: a watch begun after a
                // commit resolved never reports it.
                publish(&self.watchers, &jobs);
                let mut carry: Vec<Job> = jobs.into_iter().filter_map(settle_success).collect();
                if carry.is_empty() {
                    for barrier in barriers {
                        settle_success(barrier);
                    }
                } else {
                    // A follow-up lease still serves waiters of this batch: barriers wait for it.
                    carry.extend(barriers);
                }
                carry
            }
            Err(err) => {
                self.broke();
                self.stats.failed_batches.fetch_add(1, Ordering::Relaxed);
                for job in jobs {
                    fail_job(job, &err);
                }
                Vec::new()
            }
        }
    }

    /// Writes one batch (see [`Writer::write_unguarded`]). redb panics on some damaged pages
    /// instead of returning an error: that is a corrupt file, and the writer goes on.
    fn write(&mut self, jobs: &[Job], mode: Mode) -> Result<Written> {
        catch_unwind(AssertUnwindSafe(|| self.write_unguarded(jobs, mode))).unwrap_or_else(
            |panic| {
                if let Some(log) = self.log.as_mut() {
                    // Whatever it logged for this batch must never be replayed.
                    log.revoke();
                }
                Err(Error::DatabaseCorrupt {
                    path: self.file.path().to_string(),
                    detail: format!(
                        "the transaction was rolled back: redb failed on a damaged page: {}",
                        crate::error::panic_message(&*panic)
                    ),
                })
            },
        )
    }

    /// Writes one batch. A durable one is a synced log record and a redb commit without a
    /// sync; a checkpoint (or a durable batch the log cannot take) a durable redb commit, which
    /// starts the log over under a new tag. The log record goes first: a batch whose record
    /// could not be written is not committed at all.
    fn write_unguarded(&mut self, jobs: &[Job], mode: Mode) -> Result<Written> {
        let path = self.file.path();
        let db = self.file.db()?;
        let ops = batch_ops(jobs);
        // A record the log could not write or sync (it may have landed all the same) is never
        // replayed: the batch becomes a checkpoint, whose new tag retires it durably.
        let logged = match (&mut self.log, mode) {
            (Some(log), Mode::Deferred | Mode::Durable) => {
                log.append(&ops, mode == Mode::Durable).ok() == Some(Appended::Logged)
            }
            _ => false,
        };
        // Without a log, a deferred batch is a commit without a sync. With one, a batch the
        // log did not take is a checkpoint: else a later logged batch could outlive it.
        // Whether a log can be kept: its file is opened before a checkpoint names a tag for it.
        let keeps_log = self.log.as_mut().is_some_and(Log::is_usable);
        let mut checkpoint = !logged && (keeps_log || mode != Mode::Deferred);
        // A checkpoint names the log's new tag (none at close, or when no log can be kept):
        // records of an older one are never replayed.
        let tag_for = |checkpoint: bool| match (keeps_log, checkpoint) {
            (true, true) => Some((mode != Mode::Final).then(wal::fresh_tag)),
            (false, true) if self.log.is_some() => Some(None),
            _ => None,
        };
        let mut log_tag = tag_for(checkpoint);
        crate::error::take_previous_io();
        // Until the outcome is known, readers of the tables written neither cache what they
        // read nor keep snapshots, and the keys written leave the cache (see
        // `EntryCache::begin_commit`). Ended however this ends, a panic included.
        let committing = Committing::begin(&self.file, jobs);
        let mut committed = commit(db.writable(path), &ops, checkpoint, log_tag, path);
        // Two failures a reopen cures, after which the batch is committed as a checkpoint:
        // - A commit without a sync cannot reuse the pages freed since the last checkpoint, so
        //   a full disk refuses it where a durable commit would go through: reopened at its last
        //   durable state, those pages are free again (the changes since are written again).
        // - redb refused the commit, having written nothing, because a read of another thread
        //   failed a moment ago (redb then refuses all I/O until the file is reopened) and that
        //   reader has not yet told the writer (`mark_read_failed`).
        let no_space = !checkpoint && self.log.is_some() && is_no_space(&committed);
        if no_space || (committed.is_err() && crate::error::take_previous_io()) {
            checkpoint = true;
            log_tag = tag_for(true);
            // The old instance goes first: redb opens a file once per process.
            drop(db);
            committed = self
                .file
                .recover()
                .and_then(|()| self.file.db())
                .and_then(|db| commit(db.writable(path), &ops, true, log_tag, path));
        }
        drop(committing);
        if let Some(log) = self.log.as_mut() {
            match (&committed, log_tag) {
                (Err(_), _) => log.revoke(),
                (Ok(()), Some(tag)) => log.restart(tag),
                (Ok(()), None) => log.committed(),
            }
        }
        committed?;
        let mut unsynced = self.file.unsynced();
        if checkpoint {
            unsynced.clear();
        } else {
            // Only redb's live instance has them (and the log, when it took them): a reopen
            // after a failure writes them again.
            // Key leases' bookkeeping too: a reopen must not hand their numbers out again.
            let leases = ops
                .iter()
                .filter(|op| op.table == META_TABLE.name())
                .map(|op| (op.table, op.key, op.value.as_deref().map(Arc::from)))
                .collect::<Vec<_>>();
            unsynced.record(
                logged,
                logged && mode == Mode::Durable,
                jobs.iter()
                    .flat_map(Job::changes)
                    .map(|(table, key, change)| (table.redb_name.as_str(), key, change.record()))
                    .chain(leases),
            );
        }
        Ok(Written {
            checkpoint,
            durable: checkpoint || (logged && mode == Mode::Durable),
        })
    }
}

/// A transaction in flight for the caches (see [`EntryCache::begin_commit`]): begun on every
/// table the batch writes, with its keys forgotten; ended on every table of the file when
/// dropped, so no read snapshot kept from before outlives it.
struct Committing<'a>(&'a StoreFile);

impl<'a> Committing<'a> {
    fn begin(file: &'a StoreFile, jobs: &[Job]) -> Self {
        let mut begun: Vec<&Arc<TableState>> = Vec::new();
        for (table, key, _) in jobs.iter().flat_map(Job::changes) {
            if !begun.iter().any(|t| Arc::ptr_eq(t, table)) {
                table.cache.begin_commit();
                begun.push(table);
            }
            table.cache.forget(key);
        }
        Committing(file)
    }
}

impl Drop for Committing<'_> {
    fn drop(&mut self) {
        self.0.end_commit();
    }
}

/// The disk (or the user's quota on it) is full.
fn is_no_space(outcome: &Result<()>) -> bool {
    // ENOSPC, and Linux's EDQUOT.
    matches!(
        outcome,
        Err(Error::Io {
            errno: Some(28 | 122),
            ..
        })
    )
}

/// One redb transaction of `ops`, durable for a checkpoint; `log_tag`: the log's tag to record
/// (Some(None): retire the log).
fn commit(
    db: Result<&redb::Database>,
    ops: &[Op<'_>],
    checkpoint: bool,
    log_tag: Option<Option<u64>>,
    path: &str,
) -> Result<()> {
    let redb_err = |e: redb::Error| from_redb(path, e);
    let mut txn = db?.begin_write().map_err(|e| redb_err(e.into()))?;
    txn.set_durability(if checkpoint {
        Durability::Immediate
    } else {
        Durability::None
    })
    .map_err(|e| redb_err(e.into()))?;
    wal::apply(&txn, ops, path)?;
    if let Some(tag) = log_tag {
        let mut meta = txn.open_table(META_TABLE).map_err(|e| redb_err(e.into()))?;
        let format = match tag {
            Some(tag) => {
                meta.insert(WAL_KEY, tag.to_le_bytes().as_slice())
                    .map_err(|e| redb_err(e.into()))?;
                FORMAT_WITH_LOG
            }
            None => {
                meta.remove(WAL_KEY).map_err(|e| redb_err(e.into()))?;
                FORMAT_VERSION
            }
        };
        meta.insert(FORMAT_KEY, format.to_le_bytes().as_slice())
            .map_err(|e| redb_err(e.into()))?;
    }
    txn.commit().map_err(|e| redb_err(e.into()))
}

/// The changes a batch writes, in order: entries, and the bookkeeping of key leases.
fn batch_ops(jobs: &[Job]) -> Vec<Op<'_>> {
    let mut ops = Vec::new();
    for job in jobs {
        for (state, key, change) in job.changes() {
            ops.push(Op {
                table: state.redb_name.as_str(),
                key,
                value: match change {
                    Change::Put(record) => Some(Cow::Borrowed(&**record)),
                    Change::Delete => None,
                },
            });
        }
        if let Job::Lease { table, until, .. } = job {
            ops.push(Op {
                table: META_TABLE.name(),
                key: table.sequence_key.as_str(),
                value: Some(Cow::Owned(until.to_le_bytes().to_vec())),
            });
            if let Some(format) = table.key_format() {
                ops.push(Op {
                    table: META_TABLE.name(),
                    key: table.keys_key.as_str(),
                    value: Some(Cow::Owned(format.encode().into_bytes())),
                });
            }
        }
    }
    ops
}

fn push_job(jobs: &mut Vec<Job>, job: Job) {
    match job {
        Job::Many(many) => jobs.extend(many),
        Job::Wake => {}
        one => jobs.push(one),
    }
}

/// Hands a written batch (one transaction) to the file's watchers as one run, in commit order;
/// nothing but one atomic load when nobody watches. The cache has the batch already (see
/// [`apply_to_caches`]), so a watcher that reads an entry it heard of reads at least that.
fn publish(watchers: &WatchHub, jobs: &[Job]) {
    if !watchers.is_watched() {
        return;
    }
    let changes: Vec<_> = jobs.iter().flat_map(Job::changes).collect();
    watchers.publish(
        0,
        changes.iter().map(|(table, key, change)| {
            let record = match change {
                Change::Put(record) => Some(record),
                Change::Delete => None,
            };
            (table.name.as_str(), *key, record)
        }),
    );
}

/// A written batch into each table's cache, once per table in commit order, so a key written
/// twice in the batch (two `update_only` commits) goes straight to its last value: applied job
/// by job, a reader could read the last value from the file, then hit the first.
fn apply_to_caches(jobs: &[Job]) {
    /// One table's changes of the batch, in commit order.
    type TableChanges<'a> = (&'a Arc<TableState>, Vec<(&'a str, Cached)>);
    let mut by_table: Vec<TableChanges> = Vec::new();
    for (table, key, change) in jobs.iter().flat_map(Job::changes) {
        let record = change.record();
        match by_table.iter_mut().find(|(t, _)| Arc::ptr_eq(t, table)) {
            Some((_, changes)) => changes.push((key, record)),
            None => by_table.push((table, vec![(key, record)])),
        }
    }
    for (table, changes) in by_table {
        table.cache.apply(changes);
    }
}

/// After a durable write (the cache has it already): locks, then the caller.
fn settle_success(job: Job) -> Option<Job> {
    match job {
        Job::Commit(c) => {
            let after_delete = matches!(c.change, Change::Delete);
            if c.release {
                // The token was checked at submit and only the writer or the holder releases.
                let _ = c.table.locks.release(&c.key, c.token, after_delete);
            }
            (c.done)(Ok(()));
            None
        }
        Job::Group(g) => {
            // Every entry's new record is in the cache before any lock goes: a waiter granted
            // one key of the group sees the others' new records too.
            if g.release {
                for part in &g.parts {
                    let after_delete = matches!(part.change, Change::Delete);
                    let _ = part
                        .table
                        .locks
                        .release(&part.key, part.token, after_delete);
                }
            }
            (g.done)(Ok(()));
            None
        }
        Job::Lease {
            table,
            until,
            durable,
        } => {
            let (served, again) = table.sequence().leased(until);
            for (waiter, n) in served {
                waiter(Ok(n));
            }
            again.map(|until| Job::Lease {
                table,
                until,
                durable,
            })
        }
        Job::Barrier(done) => {
            // Maintenance runs in barriers: a panic there must not take the writer down.
            let _ = catch_unwind(AssertUnwindSafe(done));
            None
        }
        Job::Many(_) | Job::Wake | Job::Shutdown => None,
    }
}

/// The key of a lock that `job` needs and no longer holds (its handle closed meanwhile).
fn lost_lock(job: &Job) -> Option<String> {
    match job {
        Job::Commit(c) if !c.table.locks.holds(&c.key, c.token) => Some(c.key.to_string()),
        Job::Group(g) => g
            .parts
            .iter()
            .find(|p| !p.table.locks.holds(&p.key, p.token))
            .map(|p| p.key.to_string()),
        _ => None,
    }
}

/// Settles a job that will not be written, with `err`.
pub(crate) fn fail_job(job: Job, err: &Error) {
    match job {
        Job::Commit(c) => {
            if !c.hold_on_failure {
                let _ = c.table.locks.release(&c.key, c.token, false);
            }
            (c.done)(Err(err.clone()));
        }
        Job::Group(g) => {
            if !g.hold_on_failure {
                for part in &g.parts {
                    let _ = part.table.locks.release(&part.key, part.token, false);
                }
            }
            (g.done)(Err(err.clone()));
        }
        Job::Lease { table, .. } => {
            let failed = table.sequence().lease_failed(err);
            for (waiter, err) in failed {
                waiter(Err(err));
            }
        }
        Job::Barrier(done) => done(),
        Job::Many(many) => {
            for job in many {
                fail_job(job, err);
            }
        }
        Job::Wake | Job::Shutdown => {}
    }
}
