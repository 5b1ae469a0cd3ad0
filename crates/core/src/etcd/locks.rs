//! Locks across processes. In front, the crate's in-process FIFO [`LockTable`]: it decides which
//! handle of this process holds a key. Behind it, one etcd lock key per *process* per key,
//! taken with etcd's mutex recipe (`P/lock/<t>/<hex(key)>/<lease>`, attached to the session
//! lease; the oldest key by create revision holds the lock, the others wait for the deletion of
//! the key just before theirs). A local grant is handed to the caller only once the process
//! holds the etcd key; a local holder hands the lock to the next local waiter without a round
//! trip, keeping the etcd key; a key released with no local waiter has its etcd key deleted.
//!
//! Fairness trade-off: a process keeps a hot key for as long as it has local waiters for it, so
//! another process waits until this process's local queue for the key runs dry (or its session
//! ends). Within a process waiters are served first come, first served; across processes the
//! etcd queue is FIFO by the time each process first asked.
//!
//! One task per key ("driver", at most one at a time) does every etcd step of that key in
//! sequence, so a deletion of the etcd key never races a later acquisition of it. The fence of
//! a commit is the create revision of the process's lock key.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, SortOrder, SortTarget, Txn, TxnOp};
use tokio::sync::Notify;

use crate::error::{Error, Result};
use crate::locks::{Acquire, Grant, GrantCallback, LockTable, LockToken, OwnerId};

use super::client::{runtime, txn_gets, Effect};
use super::core::{Core, TableState};

/// The process's etcd lock key of one key.
#[derive(Debug, Clone)]
pub(crate) struct EtcdKey {
    pub lease: i64,
    pub lock_key: String,
    /// Create revision of the lock key: the fence of commits.
    pub fence: i64,
    /// First in the key's etcd queue (held); false while still queued.
    pub owner: bool,
    /// A commit under this key ended with an unknown outcome (sent, then no answer): the
    /// replica may lack its write, and the request may still land. The key is deleted and
    /// taken afresh (a new fence) before the lock is granted to anyone else.
    pub doubtful: bool,
}

struct Pending {
    owner: OwnerId,
    ticket: u64,
    grant: Grant,
    notify: GrantCallback,
}

#[derive(Default)]
struct KeyEntry {
    etcd: Option<EtcdKey>,
    /// The local holder waiting for the etcd lock.
    pending: Option<Pending>,
    driver: bool,
    changed: Arc<Notify>,
}

#[derive(Default)]
struct State {
    keys: HashMap<String, KeyEntry>,
    /// (owner, ticket) of each pending waiter → its key.
    pending: HashMap<(OwnerId, u64), String>,
    /// Waits not parked in `pending` yet (queued locally, or granted locally and on their way
    /// to [`park`]), with the reason they were cancelled while their local grant was on its
    /// way (so the cancel is not lost).
    queued: HashMap<(OwnerId, u64), Option<Error>>,
}

pub(crate) struct KeyLocks {
    pub local: LockTable,
    state: Mutex<State>,
}

impl KeyLocks {
    pub fn new() -> KeyLocks {
        KeyLocks {
            local: LockTable::new(),
            state: Mutex::default(),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Locks held and waited for, as a caller sees them: a local grant still waiting for the
    /// etcd lock (another process holds it) is waiting, not held.
    pub fn counts(&self) -> crate::locks::LockCounts {
        let local = self.local.counts();
        let parked = self.state().pending.len() as u64;
        crate::locks::LockCounts {
            held: local.held.saturating_sub(parked),
            waiting: local.waiting + parked,
        }
    }

    /// The live etcd lock of `key`, if this process holds it.
    fn held(&self, core: &Core, key: &str) -> Option<EtcdKey> {
        held_in(&self.state(), core, key).cloned()
    }

    /// Whether the process's etcd lock of `key` may be handed to another local holder: held,
    /// and not in doubt after a commit of unknown outcome.
    fn grantable(&self, core: &Core, key: &str) -> bool {
        held_in(&self.state(), core, key).is_some_and(|e| !e.doubtful)
    }

    /// A commit under `etcd` ended with an unknown outcome: rotate the key before the next
    /// grant (see [`EtcdKey::doubtful`]). The current holder keeps its fence.
    pub fn commit_in_doubt(&self, key: &str, etcd: &EtcdKey) {
        let mut state = self.state();
        if let Some(held) = state.keys.get_mut(key).and_then(|e| e.etcd.as_mut()) {
            if held.lock_key == etcd.lock_key && held.fence == etcd.fence {
                held.doubtful = true;
            }
        }
    }

    /// Whether `token` holds `key`, here and in etcd (as far as this process knows).
    pub fn holds(&self, core: &Core, key: &str, token: LockToken) -> bool {
        self.local.holds(key, token) && self.held(core, key).is_some()
    }

    /// The fence for a commit under `token`: LockReleased if it does not hold the key here,
    /// LockLost if the process's etcd lock is gone.
    pub fn fence(&self, core: &Core, key: &str, token: LockToken) -> Result<EtcdKey> {
        if !self.local.holds(key, token) {
            return Err(Error::LockReleased {
                key: key.to_string(),
            });
        }
        self.held(core, key).ok_or_else(|| Error::LockLost {
            key: key.to_string(),
        })
    }

    /// A lock key of this process was seen deleted at `revision`: the lock it stood for is lost.
    /// Returns whether a lock this process held (or had queued for) was lost so: then the
    /// session may be gone too.
    pub fn etcd_key_deleted(&self, key: &str, lease: i64, revision: i64) -> bool {
        let mut state = self.state();
        let Some(entry) = state.keys.get_mut(key) else {
            return false;
        };
        let gone = entry
            .etcd
            .as_ref()
            .is_some_and(|e| e.lease == lease && revision > e.fence);
        if gone {
            entry.etcd = None;
        }
        // A driver queued for the lock looks again (its own key may be the one gone).
        entry.changed.notify_one();
        gone
    }

    /// A commit deleted the process's lock key of `key` with its write (the lock was being
    /// released with no local waiter): forget it, so a local waiter that came meanwhile takes
    /// the etcd lock afresh instead of being handed a key that is gone.
    pub fn etcd_key_released(&self, key: &str, etcd: &EtcdKey) {
        let mut state = self.state();
        if let Some(entry) = state.keys.get_mut(key) {
            if entry
                .etcd
                .as_ref()
                .is_some_and(|e| e.lock_key == etcd.lock_key && e.fence == etcd.fence)
            {
                entry.etcd = None;
            }
        }
    }

    /// The driver's etcd key of `key` after a step.
    fn set_etcd(&self, key: &str, etcd: Option<EtcdKey>) {
        if let Some(entry) = self.state().keys.get_mut(key) {
            entry.etcd = etcd;
        }
    }

    /// Keys with etcd state (for close and session changes).
    fn keys(&self) -> Vec<String> {
        self.state().keys.keys().cloned().collect()
    }
}

/// The live etcd lock of `key` in `state`, if this process holds it.
fn held_in<'a>(state: &'a State, core: &Core, key: &str) -> Option<&'a EtcdKey> {
    let etcd = state.keys.get(key)?.etcd.as_ref()?;
    (etcd.owner && core.session.is_live(etcd.lease)).then_some(etcd)
}

/// Asks for `key`'s lock for `owner`. See [`super::ClusterMap::acquire`].
pub(crate) fn acquire(
    core: &Arc<Core>,
    table: &Arc<TableState>,
    owner: OwnerId,
    key: &str,
    ticket: u64,
    make_waiter: impl FnOnce() -> Result<GrantCallback>,
) -> Result<Acquire> {
    let id = (owner, ticket);
    let mut make = Some(make_waiter);
    let weak = Arc::downgrade(core);
    // Registered before queueing (never under the local table's lock: the driver takes the
    // two the other way round), and kept until the wait is parked for the etcd lock or
    // granted ([`park`]), so a cancel always finds it. A ticket still waiting (queued here, on
    // its way, or parked) is not registered again: such a wait is refused below.
    let reused = {
        let mut state = table.locks.state();
        let reused = state.queued.contains_key(&id) || state.pending.contains_key(&id);
        if !reused {
            state.queued.insert(id, None);
        }
        reused
    };
    let forget = || {
        if !reused {
            table.locks.state().queued.remove(&id);
        }
    };
    let outcome = table.locks.local.acquire(key, owner, ticket, || {
        if reused {
            return Err(ticket_in_use(ticket));
        }
        let notify = shielded((make.take().expect("called once"))()?);
        Ok(local_waiter(
            weak.clone(),
            table.clone(),
            key,
            owner,
            ticket,
            notify,
        ))
    });
    let grant = match outcome {
        Ok(Acquire::Queued) => return Ok(Acquire::Queued),
        Ok(Acquire::Granted(grant)) => grant,
        Err(err) => {
            forget();
            return Err(err);
        }
    };
    if table.locks.grantable(core, key) {
        // The etcd key is still ours (released a moment ago, not deleted yet): no round trip.
        forget();
        return Ok(Acquire::Granted(grant));
    }
    let made = match reused {
        true => Err(ticket_in_use(ticket)),
        false => (make.take().expect("not used by a free key"))(),
    };
    let notify = match made {
        Ok(notify) => shielded(notify),
        Err(err) => {
            forget();
            let _ = release(core, table, key, grant.token, false);
            return Err(err);
        }
    };
    park(
        core,
        table,
        key,
        Pending {
            owner,
            ticket,
            grant,
            notify,
        },
    );
    Ok(Acquire::Queued)
}

fn ticket_in_use(ticket: u64) -> Error {
    Error::invalid(format!(
        "lock-wait ticket {ticket} is still waiting; tickets must be unique"
    ))
}

/// A caller's callback that may panic without taking down the key's driver (which would leave
/// the key stuck for every later waiter).
fn shielded(notify: GrantCallback) -> GrantCallback {
    Box::new(move |outcome| {
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| notify(outcome)));
    })
}

/// Wraps a local waiter's callback: a local grant becomes the caller's once the etcd lock is
/// held (at once when the process holds it already).
fn local_waiter(
    core: Weak<Core>,
    table: Arc<TableState>,
    key: &str,
    owner: OwnerId,
    ticket: u64,
    notify: GrantCallback,
) -> GrantCallback {
    let key = key.to_string();
    Box::new(move |outcome| {
        let grant = match outcome {
            Ok(grant) => grant,
            Err(err) => {
                table.locks.state().queued.remove(&(owner, ticket));
                return notify(Err(err));
            }
        };
        let Some(core) = core.upgrade() else {
            table.locks.state().queued.remove(&(owner, ticket));
            let _ = table.locks.local.release(&key, grant.token, false);
            return notify(Err(Error::StoreClosed));
        };
        park(
            &core,
            &table,
            &key,
            Pending {
                owner,
                ticket,
                grant,
                notify,
            },
        );
    })
}

/// A local grant on its way to its caller: rejected if the wait was cancelled meanwhile (the
/// grant released), handed over now if the process holds the key's etcd lock (not in doubt),
/// else parked until the driver holds it. Taking the wait out of `queued` and parking it in
/// `pending` is one step under the state's mutex, so a cancel finds it in one or the other.
fn park(core: &Arc<Core>, table: &Arc<TableState>, key: &str, pending: Pending) {
    enum Next {
        Cancelled(Pending, Error),
        Grant(Pending),
        Parked(Option<Pending>),
    }
    let id = (pending.owner, pending.ticket);
    let next = {
        let mut state = table.locks.state();
        match state.queued.remove(&id).flatten() {
            Some(reason) => Next::Cancelled(pending, reason),
            None if held_in(&state, core, key).is_some_and(|e| !e.doubtful) => Next::Grant(pending),
            None => Next::Parked(register(&mut state, table, key, pending)),
        }
    };
    match next {
        Next::Cancelled(pending, reason) => {
            // Cancelled (timeout, abort, close) while the grant was on its way.
            let _ = release(core, table, key, pending.grant.token, false);
            (pending.notify)(Err(reason));
        }
        Next::Grant(pending) => (pending.notify)(Ok(pending.grant)),
        Next::Parked(stale) => {
            if let Some(stale) = stale {
                if table.locks.local.holds(key, stale.grant.token) {
                    let _ = table.locks.local.release(key, stale.grant.token, false);
                }
                (stale.notify)(Err(Error::StoreClosed));
            }
            poke(core, table, key);
        }
    }
}

/// Parks a local grant until the driver holds the etcd lock; returns a stale pending grant it
/// replaced, to be told.
fn register(state: &mut State, table: &TableState, key: &str, pending: Pending) -> Option<Pending> {
    let entry = state.keys.entry(key.to_string()).or_default();
    // One local holder at a time: a pending grant already here is stale (its token was
    // released, e.g. its handle closed) unless it still holds the key, and then the new
    // one is.
    let (keep, stale) = match entry.pending.take() {
        Some(old) if table.locks.local.holds(key, old.grant.token) => (old, Some(pending)),
        old => (pending, old),
    };
    let id = (keep.owner, keep.ticket);
    entry.pending = Some(keep);
    state.pending.insert(id, key.to_string());
    if let Some(stale) = &stale {
        if (stale.owner, stale.ticket) != id {
            state.pending.remove(&(stale.owner, stale.ticket));
        }
    }
    stale
}

/// Has the key's driver look at the key again (starting it if none runs).
pub(crate) fn poke(core: &Arc<Core>, table: &Arc<TableState>, key: &str) {
    let mut state = table.locks.state();
    let entry = state.keys.entry(key.to_string()).or_default();
    entry.changed.notify_one();
    if !entry.driver {
        entry.driver = true;
        runtime().spawn(drive(core.clone(), table.clone(), key.to_string()));
    }
}

/// Drops `token`'s lock on `key` (handing it to the next local waiter, if any).
pub(crate) fn release(
    core: &Arc<Core>,
    table: &Arc<TableState>,
    key: &str,
    token: LockToken,
    after_delete: bool,
) -> Result<()> {
    table.locks.local.release(key, token, after_delete)?;
    poke(core, table, key);
    Ok(())
}

/// Gives up a wait: queued locally, or granted locally and waiting for etcd.
pub(crate) fn cancel_wait(
    core: &Arc<Core>,
    table: &Arc<TableState>,
    owner: OwnerId,
    ticket: u64,
    reason: Error,
) -> bool {
    if table.locks.local.cancel(owner, ticket, reason.clone()) {
        return true;
    }
    let found = {
        let mut state = table.locks.state();
        let Some(key) = state.pending.remove(&(owner, ticket)) else {
            // Granted locally, its callback not run yet: it rejects with `reason` when it does.
            return match state.queued.get_mut(&(owner, ticket)) {
                Some(slot) => {
                    slot.get_or_insert(reason);
                    true
                }
                None => false,
            };
        };
        let pending = state.keys.get_mut(&key).and_then(|e| e.pending.take());
        pending.map(|p| (key, p))
    };
    let Some((key, pending)) = found else {
        return false;
    };
    let _ = table.locks.local.release(&key, pending.grant.token, false);
    (pending.notify)(Err(reason));
    poke(core, table, &key);
    true
}

/// Frees everything `owner` holds or waits for (its handle closes): waiters hear StoreClosed,
/// and etcd keys nobody here wants any more are deleted.
pub(crate) fn release_owner(core: &Arc<Core>, table: &Arc<TableState>, owner: OwnerId) {
    let pendings: Vec<Pending> = {
        let mut state = table.locks.state();
        let mine: Vec<((OwnerId, u64), String)> = state
            .pending
            .iter()
            .filter(|((o, _), _)| *o == owner)
            .map(|(id, key)| (*id, key.clone()))
            .collect();
        let mut taken = Vec::new();
        for (id, key) in mine {
            state.pending.remove(&id);
            if let Some(p) = state.keys.get_mut(&key).and_then(|e| e.pending.take()) {
                taken.push(p);
            }
        }
        taken
    };
    table.locks.local.release_owner(owner);
    for pending in pendings {
        (pending.notify)(Err(Error::StoreClosed));
    }
    for key in table.locks.keys() {
        poke(core, table, &key);
    }
}

enum Step {
    Grant(Pending),
    Acquire(Arc<Notify>, Option<EtcdKey>),
    /// Delete a key in doubt, to take it afresh for the pending holder.
    Rotate(EtcdKey),
    Delete(EtcdKey),
}

/// The key's driver: brings the etcd lock in line with what the process wants, one step at a
/// time, until there is nothing to do.
async fn drive(core: Arc<Core>, table: Arc<TableState>, key: String) {
    let mut pause = Duration::from_millis(50);
    loop {
        let step = {
            let mut state = table.locks.state();
            let entry = state.keys.get_mut(&key).expect("a driven key has an entry");
            if entry
                .etcd
                .as_ref()
                .is_some_and(|e| !core.session.is_live(e.lease))
            {
                // The session ended: its keys are gone with its lease.
                entry.etcd = None;
            }
            let wanted = table.locks.local.is_locked(&key) && !core.is_closed();
            let held = entry.etcd.as_ref().is_some_and(|e| e.owner);
            let doubtful = entry.etcd.as_ref().is_some_and(|e| e.doubtful);
            match (wanted, entry.pending.is_some()) {
                (true, true) if doubtful => Step::Rotate(entry.etcd.clone().expect("checked")),
                (true, true) if held => {
                    let pending = entry.pending.take().expect("checked");
                    state.pending.remove(&(pending.owner, pending.ticket));
                    Step::Grant(pending)
                }
                (true, true) => Step::Acquire(entry.changed.clone(), entry.etcd.clone()),
                (false, _) if entry.etcd.is_some() => {
                    Step::Delete(entry.etcd.take().expect("checked"))
                }
                _ => {
                    // Held for a local holder, or nothing at all: done for now.
                    entry.driver = false;
                    let stale = if wanted { None } else { entry.pending.take() };
                    if entry.etcd.is_none() && entry.pending.is_none() {
                        state.keys.remove(&key);
                    }
                    if let Some(stale) = &stale {
                        state.pending.remove(&(stale.owner, stale.ticket));
                    }
                    drop(state);
                    if let Some(stale) = stale {
                        (stale.notify)(Err(Error::StoreClosed));
                    }
                    return;
                }
            }
        };
        match step {
            Step::Grant(pending) => {
                if table.locks.local.holds(&key, pending.grant.token) {
                    (pending.notify)(Ok(pending.grant));
                } else {
                    (pending.notify)(Err(Error::StoreClosed));
                }
            }
            Step::Acquire(changed, queued) => {
                match acquire_etcd(&core, &table, &key, &changed, queued).await {
                    Ok(etcd) => table.locks.set_etcd(&key, etcd),
                    Err((err, etcd)) => {
                        table.locks.set_etcd(&key, etcd);
                        fail_pending(&table, &key, err);
                    }
                }
            }
            Step::Rotate(etcd) => match delete_lock_key(&core, &etcd, "renewing a lock").await {
                Ok(()) => table.locks.etcd_key_released(&key, &etcd),
                // The key stays in doubt.
                Err(err) => fail_pending(&table, &key, err),
            },
            Step::Delete(etcd) => {
                let deleted = delete_lock_key(&core, &etcd, "releasing a lock").await;
                match deleted {
                    Ok(()) => pause = Duration::from_millis(50),
                    Err(_) if core.session.is_live(etcd.lease) && !core.is_closed() => {
                        // The cluster is away: keep the key and try again later (unless the
                        // process wants the lock again meanwhile).
                        {
                            let mut state = table.locks.state();
                            let entry =
                                state.keys.get_mut(&key).expect("a driven key has an entry");
                            entry.etcd.get_or_insert(etcd);
                        }
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(2));
                    }
                    Err(_) => {}
                }
            }
        }
    }
}

/// The pending holder's wait for the etcd lock failed: it hears `err`, and the next local
/// waiter (if any) tries again.
fn fail_pending(table: &TableState, key: &str, err: Error) {
    let pending = {
        let mut state = table.locks.state();
        let pending = state.keys.get_mut(key).and_then(|e| e.pending.take());
        if let Some(p) = &pending {
            state.pending.remove(&(p.owner, p.ticket));
        }
        pending
    };
    if let Some(pending) = pending {
        let _ = table.locks.local.release(key, pending.grant.token, false);
        (pending.notify)(Err(err));
    }
}

/// Deletes the process's lock key `etcd` (whatever its state); the replica learns the revision.
async fn delete_lock_key(core: &Arc<Core>, etcd: &EtcdKey, what: &str) -> Result<()> {
    let lock_key = etcd.lock_key.clone();
    let answer = core
        .cluster
        .call(what, Effect::Unknown, || {
            let mut kv = core.cluster.kv.clone();
            let lock_key = lock_key.clone();
            async move { kv.delete(lock_key, None).await }
        })
        .await?;
    if let Some(h) = answer.header() {
        core.replica.saw_revision(h.revision());
    }
    Ok(())
}

/// Whether the driver should go on waiting for the etcd lock.
fn still_wanted(core: &Core, table: &TableState, key: &str) -> bool {
    table.locks.local.is_locked(key)
        && !core.is_closed()
        && table
            .locks
            .state()
            .keys
            .get(key)
            .is_some_and(|e| e.pending.is_some())
}

/// Takes the process's place in the key's etcd queue and waits for its turn (etcd's mutex
/// recipe). Ok(Some) when held; Ok(None) when nobody here wants it any more (its queued key
/// deleted). On failure, the key that may be left in etcd comes back with the error.
async fn acquire_etcd(
    core: &Arc<Core>,
    table: &Arc<TableState>,
    key: &str,
    changed: &Notify,
    queued: Option<EtcdKey>,
) -> std::result::Result<Option<EtcdKey>, (Error, Option<EtcdKey>)> {
    let layout = &core.layout;
    let prefix = layout.lock_prefix(&table.name, key);
    let data_key = layout.data_key(&table.name, key);
    let mut sessions = core.session.subscribe();
    let mut retries = 3;
    'session: loop {
        let lease = core.session.live().await.map_err(|e| (e, None))?;
        let lock_key = layout.lock_key(&table.name, key, lease.id);
        let mine = queued
            .as_ref()
            .filter(|q| q.lease == lease.id && q.lock_key == lock_key);
        let mut etcd = EtcdKey {
            lease: lease.id,
            lock_key: lock_key.clone(),
            fence: mine.map_or(0, |q| q.fence),
            owner: false,
            doubtful: false,
        };
        // Queue up (or find our place): put our key unless it exists; read the queue's head
        // and the entry in the same revision.
        let first = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Create, SortOrder::Ascend)
            .with_limit(1);
        let txn = Txn::new()
            .when([Compare::create_revision(
                lock_key.clone(),
                CompareOp::Equal,
                0,
            )])
            .and_then([
                TxnOp::put(
                    lock_key.clone(),
                    "",
                    Some(PutOptions::new().with_lease(lease.id)),
                ),
                TxnOp::get(prefix.clone(), Some(first.clone())),
                TxnOp::get(data_key.clone(), None),
            ])
            .or_else([
                TxnOp::get(lock_key.clone(), None),
                TxnOp::get(prefix.clone(), Some(first)),
                TxnOp::get(data_key.clone(), None),
            ]);
        let answer = core.locker.run(txn, 3).await;
        let (revision, answer) = match answer {
            Err(err) if err.to_string().contains("lease not found") && retries > 0 => {
                // The session's lease is gone (revoked, expired) before the keep-alive knew.
                retries -= 1;
                core.session.lost(lease.id);
                continue 'session;
            }
            other => other.map_err(|e| (e, Some(etcd.clone())))?,
        };
        core.replica.saw_revision(revision);
        let got = txn_gets(&answer);
        etcd.fence = if answer.succeeded() {
            revision
        } else {
            match got[0].first() {
                Some(kv) => kv.create_revision(),
                None => continue 'session,
            }
        };
        let mut head = got[1].first().map(|kv| kv.key().to_vec());
        let mut record = (
            revision,
            got[2].first().map(|kv| Arc::<[u8]>::from(kv.value())),
        );
        loop {
            if head.as_deref() == Some(lock_key.as_bytes()) {
                if !core.session.is_live(lease.id) {
                    continue 'session;
                }
                // The latest committed value, read under the lock: the replica holds it (or
                // something newer) before the grant.
                core.replica
                    .apply_known(record.0, &[(&table.name, key, record.1.clone())]);
                etcd.owner = true;
                return Ok(Some(etcd));
            }
            // Wait for the deletion of the key just before ours.
            let before = GetOptions::new()
                .with_prefix()
                .with_max_create_revision(etcd.fence - 1)
                .with_sort(SortTarget::Create, SortOrder::Descend)
                .with_limit(1);
            let txn = Txn::new().and_then([
                TxnOp::get(lock_key.clone(), None),
                TxnOp::get(prefix.clone(), Some(before)),
                TxnOp::get(data_key.clone(), None),
            ]);
            let (revision, answer) = core
                .locker
                .run(txn, 3)
                .await
                .map_err(|e| (e, Some(etcd.clone())))?;
            core.replica.saw_revision(revision);
            let got = txn_gets(&answer);
            if got[0].is_empty() {
                // Our key is gone (the session ended): queue up again.
                continue 'session;
            }
            record = (
                revision,
                got[2].first().map(|kv| Arc::<[u8]>::from(kv.value())),
            );
            let Some((before, created)) = got[1]
                .first()
                .map(|kv| (kv.key().to_vec(), kv.create_revision()))
            else {
                head = Some(lock_key.as_bytes().to_vec());
                continue;
            };
            let gone = core.replica.lock_gone(&before, created, revision);
            tokio::select! {
                _ = gone => {}
                _ = changed.notified() => {
                    if !still_wanted(core, table, key) {
                        return abandon(core, etcd).await;
                    }
                }
                _ = sessions.changed() => {
                    if !core.session.is_live(lease.id) {
                        continue 'session;
                    }
                }
            }
            head = None;
        }
    }
}

/// Nobody here wants the lock any more: leave the queue.
async fn abandon(
    core: &Arc<Core>,
    etcd: EtcdKey,
) -> std::result::Result<Option<EtcdKey>, (Error, Option<EtcdKey>)> {
    match delete_lock_key(core, &etcd, "leaving a lock queue").await {
        Ok(()) => Ok(None),
        Err(err) => Err((err, Some(etcd))),
    }
}
