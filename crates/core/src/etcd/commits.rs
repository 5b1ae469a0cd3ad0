//! Fenced commits and group commit. Each commit is a unit: its writes and their fences
//! (`CreateRevision(lockKey) == fence`). One task drains the pending units into one etcd
//! transaction per batch, each unit a nested transaction of its own, so a unit whose fence
//! failed (its lock was lost) fails alone: the others of the batch are written. A batch is
//! bounded by etcd's limits: at most 128 operations per transaction, where a nested
//! transaction's own operations count against what the outer one leaves (`units + the largest
//! unit's writes ≤ 128`, checked against etcd 3.4), no key written twice in one transaction
//! (such a unit waits for the next batch), and the request size. On success the writes reach
//! the replica at the transaction's revision before the locks are handed on and the callers
//! hear of it (read-your-writes).

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};

use etcd_client::{Compare, CompareOp, Txn, TxnOp, TxnOpResponse};
use tokio::sync::mpsc;

use crate::error::{Error, Result};
use crate::locks::LockToken;
use crate::{Change, CommitCallback};

use super::client::{runtime, Effect, MAX_REQUEST_BYTES, REQUEST_OVERHEAD};
use super::core::{Core, TableState};
use super::locks::{self, EtcdKey};
use super::replica::Known;

/// etcd's default `--max-txn-ops`.
const MAX_TXN_OPS: usize = 128;
/// Most writes one commit may carry (it must fit one transaction with room for others).
pub const MAX_COMMIT_WRITES: usize = 60;
/// Record bytes per batch: well under the request limit, so a batch is never refused for size.
const BATCH_BYTES: usize = 1 << 20;

/// Counters for `stats()`.
#[derive(Default)]
pub(crate) struct CommitStats {
    pub commits: AtomicU64,
    pub batches: AtomicU64,
    pub failed_batches: AtomicU64,
    pub largest_batch: AtomicU64,
    /// Test hook: batches still to be written whose answer is then dropped, as if it timed
    /// out after the cluster applied it.
    pub lose_answers: AtomicU64,
}

/// Commits of one handle still on their way (submitted through it, or under its locks); its
/// close waits for them.
#[derive(Default)]
pub(crate) struct InFlight {
    count: Mutex<usize>,
    idle: Condvar,
    /// The handle is closed: its locks are released (or about to be), commits under them or
    /// through it are refused.
    closed: AtomicBool,
}

impl InFlight {
    /// Marks the handle closed; false if it was already.
    pub fn close(&self) -> bool {
        !self.closed.swap(true, Ordering::SeqCst)
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    pub fn start(&self, n: usize) {
        *self.count.lock().unwrap_or_else(|p| p.into_inner()) += n;
    }

    pub fn finish(&self) {
        let mut count = self.count.lock().unwrap_or_else(|p| p.into_inner());
        *count = count.saturating_sub(1);
        if *count == 0 {
            self.idle.notify_all();
        }
    }

    /// Blocks until none is left.
    pub fn wait(&self) {
        let mut count = self.count.lock().unwrap_or_else(|p| p.into_inner());
        while *count > 0 {
            count = self.idle.wait(count).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// One key's write under its lock.
pub(crate) struct Write {
    pub table: Arc<TableState>,
    pub key: String,
    pub token: LockToken,
    pub etcd: EtcdKey,
    pub data_key: String,
    pub change: Change,
    pub release: bool,
    pub hold_on_failure: bool,
    /// The write deletes the process's lock key too (released, no local waiter when the batch
    /// was made): one round trip fewer than deleting it afterwards.
    pub fold_release: bool,
}

impl Write {
    fn bytes(&self) -> usize {
        let record = match &self.change {
            Change::Put(record) => record.len(),
            Change::Delete => 0,
        };
        record + self.data_key.len() + self.etcd.lock_key.len() + 64
    }
}

/// A commit checked and ready to be written ([`super::ClusterMap::prepare_commit`]); hand it
/// to [`super::ClusterDatabase::submit`]. Its writes land together or not at all.
pub struct ClusterCommit {
    pub(crate) writes: Vec<Write>,
    pub(crate) done: Vec<CommitCallback>,
    /// The handles whose locks the writes are under; once submitted, with the submitting one:
    /// each counts the commit in flight, so that closing it waits for the commit.
    pub(crate) in_flight: Vec<Arc<InFlight>>,
    /// The core whose locks the writes are under (its address), so that a commit is never
    /// written through another store.
    pub(crate) core: usize,
    /// Why it must not be written (see [`ClusterCommit::join`]).
    pub(crate) refused: Option<Error>,
}

impl ClusterCommit {
    /// One commit of all of `commits`' writes: written in one nested transaction, all or none
    /// (`db.commit([a, b])`); each callback hears the joint outcome. A join that cannot be
    /// written (locks of another store, more than `MAX_COMMIT_WRITES` entries, one entry
    /// twice) fails every callback with InvalidArgument when submitted, nothing written and
    /// the locks still held.
    pub fn join(commits: Vec<ClusterCommit>) -> ClusterCommit {
        let core = commits.first().map_or(0, |c| c.core);
        let mut refused = None;
        if commits.iter().any(|c| c.core != core) {
            refused = Some(Error::invalid(
                "every lock of one commit must belong to a map of the same store",
            ));
        }
        let mut joined = ClusterCommit {
            writes: Vec::new(),
            done: Vec::new(),
            in_flight: Vec::new(),
            core,
            refused: None,
        };
        for c in commits {
            joined.writes.extend(c.writes);
            joined.done.extend(c.done);
            joined.in_flight.extend(c.in_flight);
            refused = refused.or(c.refused);
        }
        if joined.writes.len() > MAX_COMMIT_WRITES {
            refused = refused.or(Some(Error::invalid(format!(
                "one etcd commit may write at most {MAX_COMMIT_WRITES} entries, got {}",
                joined.writes.len()
            ))));
        }
        let mut keys = HashSet::new();
        if !joined
            .writes
            .iter()
            .all(|w| keys.insert(w.data_key.clone()))
        {
            refused = refused.or(Some(Error::invalid(
                "one commit names the same entry twice",
            )));
        }
        joined.refused = refused;
        joined
    }

    fn bytes(&self) -> usize {
        self.writes.iter().map(Write::bytes).sum()
    }

    /// The commit as one nested transaction: every fence holds, then every write.
    fn txn(&self) -> Txn {
        let compares: Vec<Compare> = self
            .writes
            .iter()
            .map(|w| {
                Compare::create_revision(w.etcd.lock_key.clone(), CompareOp::Equal, w.etcd.fence)
            })
            .collect();
        let mut ops: Vec<TxnOp> = self
            .writes
            .iter()
            .map(|w| match &w.change {
                Change::Put(record) => TxnOp::put(w.data_key.clone(), record.to_vec(), None),
                Change::Delete => TxnOp::delete(w.data_key.clone(), None),
            })
            .collect();
        ops.extend(
            self.writes
                .iter()
                .filter(|w| w.fold_release)
                .map(|w| TxnOp::delete(w.etcd.lock_key.clone(), None)),
        );
        Txn::new().when(compares).and_then(ops)
    }
}

/// Checks a record against the cluster's request limit before anything is sent.
pub(crate) fn check_size(key: &str, record: &[u8]) -> Result<()> {
    let limit = MAX_REQUEST_BYTES - REQUEST_OVERHEAD;
    if record.len() > limit {
        return Err(Error::invalid(format!(
            "the record for '{key}' is {} bytes; an etcd cluster takes at most {limit} \
             (its request limit, --max-request-bytes, is 1.5 MiB by default)",
            record.len()
        )));
    }
    Ok(())
}

pub(crate) struct CommitQueue {
    tx: Mutex<Option<mpsc::UnboundedSender<ClusterCommit>>>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl CommitQueue {
    pub fn start(core: Weak<Core>, stats: Arc<CommitStats>) -> CommitQueue {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = runtime().spawn(run(core, stats, rx));
        CommitQueue {
            tx: Mutex::new(Some(tx)),
            task: Mutex::new(Some(task)),
        }
    }

    /// Queues `commit`; a stopped queue fails it with StoreClosed.
    pub fn submit(&self, core: &Arc<Core>, commit: ClusterCommit) {
        let refused = {
            let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
            match tx.as_ref() {
                Some(tx) => tx.send(commit).err().map(|e| e.0),
                None => Some(commit),
            }
        };
        if let Some(commit) = refused {
            settle(core, commit, Err(Error::StoreClosed));
        }
    }

    /// Lets the committer write what is queued, then stop.
    pub async fn stop(&self) {
        drop(self.tx.lock().unwrap_or_else(|p| p.into_inner()).take());
        let task = self.task.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

async fn run(
    core: Weak<Core>,
    stats: Arc<CommitStats>,
    mut rx: mpsc::UnboundedReceiver<ClusterCommit>,
) {
    let mut deferred: VecDeque<ClusterCommit> = VecDeque::new();
    loop {
        let first = match deferred.pop_front() {
            Some(c) => c,
            None => match rx.recv().await {
                Some(c) => c,
                None => return,
            },
        };
        let mut keys: HashSet<String> = first.writes.iter().map(|w| w.data_key.clone()).collect();
        // Operations of a unit's nested transaction: a write and a lock release per entry.
        let mut widest = 2 * first.writes.len();
        let mut bytes = first.bytes();
        let mut batch = vec![first];
        let mut later = VecDeque::new();
        // Deferred ones first (they came earlier), then whatever is queued now.
        loop {
            let next = match deferred.pop_front() {
                Some(c) => c,
                None => match rx.try_recv() {
                    Ok(c) => c,
                    Err(_) => break,
                },
            };
            let clash = next.writes.iter().any(|w| keys.contains(&w.data_key));
            let fits = batch.len() + 1 + widest.max(2 * next.writes.len()) <= MAX_TXN_OPS
                && bytes + next.bytes() <= BATCH_BYTES;
            if clash || !fits {
                let full = !fits;
                later.push_back(next);
                if full {
                    break;
                }
                continue;
            }
            keys.extend(next.writes.iter().map(|w| w.data_key.clone()));
            widest = widest.max(2 * next.writes.len());
            bytes += next.bytes();
            batch.push(next);
        }
        later.extend(deferred.drain(..));
        deferred = later;
        let Some(core) = core.upgrade() else {
            for c in batch.into_iter().chain(deferred.drain(..)) {
                fail_closed(c);
            }
            return;
        };
        // A commit whose lock went meanwhile (its handle closed and handed the key on) must
        // not write under the fence the next holder now uses.
        let (batch, released): (Vec<_>, Vec<_>) = batch.into_iter().partition(|c| {
            c.writes
                .iter()
                .all(|w| w.table.locks.local.holds(&w.key, w.token))
        });
        for commit in released {
            fail_released(commit);
        }
        if batch.is_empty() {
            continue;
        }
        let mut batch = batch;
        for commit in batch.iter_mut() {
            for w in commit.writes.iter_mut() {
                // Not for a holder that keeps its lock on failure: after an unknown outcome
                // its lock key must still be there for the retry.
                w.fold_release =
                    w.release && !w.hold_on_failure && !w.table.locks.local.has_waiters(&w.key);
            }
        }
        write_batch(&core, &stats, batch).await;
    }
}

fn fail_closed(commit: ClusterCommit) {
    for done in commit.done {
        tell(done, Err(Error::StoreClosed));
    }
    for in_flight in commit.in_flight {
        in_flight.finish();
    }
}

/// A commit whose lock is no longer its own: nothing written, nothing released.
fn fail_released(commit: ClusterCommit) {
    let key = commit
        .writes
        .iter()
        .find(|w| !w.table.locks.local.holds(&w.key, w.token))
        .map_or_else(String::new, |w| w.key.clone());
    for done in commit.done {
        tell(done, Err(Error::LockReleased { key: key.clone() }));
    }
    for in_flight in commit.in_flight {
        in_flight.finish();
    }
}

/// Hands a caller its outcome; a callback that panics does not take the committer down.
pub(crate) fn tell(done: CommitCallback, outcome: Result<()>) {
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| done(outcome)));
}

async fn write_batch(core: &Arc<Core>, stats: &CommitStats, batch: Vec<ClusterCommit>) {
    let n = batch.len();
    stats.batches.fetch_add(1, Ordering::Relaxed);
    stats.commits.fetch_add(n as u64, Ordering::Relaxed);
    stats.largest_batch.fetch_max(n as u64, Ordering::Relaxed);
    let txn = Txn::new().and_then(
        batch
            .iter()
            .map(|c| TxnOp::txn(c.txn()))
            .collect::<Vec<_>>(),
    );
    let what = if n == 1 {
        "the commit".to_string()
    } else {
        format!("a transaction of {n} commits")
    };
    let written = core
        .cluster
        .call(&what, Effect::Unknown, || {
            let mut kv = core.cluster.kv.clone();
            let txn = txn.clone();
            async move { kv.txn(txn).await }
        })
        .await;
    let lost = stats
        .lose_answers
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    let written = match written {
        Ok(_) if lost => Err(Error::Unavailable {
            message: "the answer to the commit was lost (test hook)".into(),
        }),
        other => other,
    };
    let answer = match written {
        Ok(answer) => answer,
        Err(Error::InvalidArgument(_)) if n > 1 => {
            // The cluster's limits are tighter than the defaults: one commit at a time.
            for commit in batch {
                Box::pin(write_batch(core, stats, vec![commit])).await;
            }
            return;
        }
        Err(err) => {
            stats.failed_batches.fetch_add(1, Ordering::Relaxed);
            for commit in batch {
                // Sent and maybe applied (or applied later): the next holder must not get
                // these locks, or read these records, before the keys are renewed.
                for w in &commit.writes {
                    w.table.locks.commit_in_doubt(&w.key, &w.etcd);
                }
                settle(core, commit, Err(err.clone()));
            }
            return;
        }
    };
    let revision = answer.header().map_or(0, |h| h.revision());
    let fenced: Vec<bool> = answer
        .op_responses()
        .into_iter()
        .map(|op| matches!(op, TxnOpResponse::Txn(t) if t.succeeded()))
        .collect();
    let written: Vec<Known<'_>> = batch
        .iter()
        .zip(&fenced)
        .filter(|(_, ok)| **ok)
        .flat_map(|(c, _)| c.writes.iter())
        .map(|w| {
            let value = w.change.record();
            (w.table.name.as_str(), w.key.as_str(), value)
        })
        .collect();
    core.replica.apply_known(revision, &written);
    drop(written);
    for (commit, ok) in batch.into_iter().zip(fenced) {
        let outcome = if ok {
            for w in commit.writes.iter().filter(|w| w.fold_release) {
                w.table.locks.etcd_key_released(&w.key, &w.etcd);
            }
            Ok(())
        } else {
            // One write's broken fence is its lock, lost. Of a joined commit's, which broke is not
            // known here: the others' lock keys are still held and must not be forgotten (nobody
            // would delete them); the replica's watch reports the keys that are gone.
            if let [w] = commit.writes.as_slice() {
                w.table
                    .locks
                    .etcd_key_deleted(&w.key, w.etcd.lease, i64::MAX);
            }
            Err(Error::LockLost {
                key: commit
                    .writes
                    .iter()
                    .map(|w| w.key.as_str())
                    .collect::<Vec<_>>()
                    .join("', '"),
            })
        };
        settle(core, commit, outcome);
    }
}

/// Hands the locks on (per the commit's options) and tells the callers, in that order.
fn settle(core: &Arc<Core>, commit: ClusterCommit, outcome: Result<()>) {
    for w in &commit.writes {
        let keep = match &outcome {
            Ok(()) => !w.release,
            Err(_) => w.hold_on_failure,
        };
        if !keep {
            let after_delete = outcome.is_ok() && matches!(w.change, Change::Delete);
            let _ = locks::release(core, &w.table, &w.key, w.token, after_delete);
        }
    }
    for done in commit.done {
        tell(done, outcome.clone());
    }
    for in_flight in commit.in_flight {
        in_flight.finish();
    }
}
