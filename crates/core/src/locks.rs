//! Per-key FIFO locks. A key has a record here only while someone holds it, so the table never
//! grows with the number of keys ever touched. Waiters are callbacks, not parked threads: the
//! Node binding resolves a promise from one, a Rust caller blocks on a channel.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use crate::error::{Error, Result};

/// Who asked for a lock: one open handle of a store. Closing the handle frees its locks.
pub type OwnerId = u64;
/// Proves that the bearer holds a key's lock; unique for the life of the process.
pub type LockToken = u64;

/// A lock handed to a caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    pub token: LockToken,
    /// The previous holder deleted the entry before handing the lock on.
    pub after_delete: bool,
}

/// Called exactly once for each queued waiter: with a grant, or with the reason it gave up.
/// It runs on the thread that released the lock, which may be the writer: like a commit
/// callback, it must not wait for the store.
pub type GrantCallback = Box<dyn FnOnce(Result<Grant>) + Send>;

struct Waiter {
    owner: OwnerId,
    ticket: u64,
    notify: GrantCallback,
}

struct KeyLock {
    token: LockToken,
    owner: OwnerId,
    waiters: VecDeque<Waiter>,
}

#[derive(Default)]
struct LockState {
    keys: HashMap<Box<str>, KeyLock>,
    /// (owner, ticket) of every queued waiter → its key, so a timeout or abort finds it.
    tickets: HashMap<(OwnerId, u64), Box<str>>,
}

/// Outcome of asking for a lock ([`MapStore::acquire`](crate::MapStore::acquire)).
pub enum Acquire {
    Granted(Grant),
    Queued,
}

/// Counts for `stats()`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LockCounts {
    pub held: u64,
    pub waiting: u64,
}

pub struct LockTable {
    state: Mutex<LockState>,
}

static NEXT_TOKEN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

fn next_token() -> LockToken {
    NEXT_TOKEN.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

impl Default for LockTable {
    fn default() -> Self {
        Self::new()
    }
}

impl LockTable {
    pub fn new() -> Self {
        LockTable {
            state: Mutex::new(LockState::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, LockState> {
        // A panic while holding this mutex cannot leave the maps half-updated in a way that
        // matters more than refusing all further locking would.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the key's lock at once when it is free. Otherwise queues a waiter built by
    /// `make_waiter` (called only then, under the table's mutex) and returns [`Acquire::Queued`].
    /// `ticket` names the wait for [`LockTable::cancel`]: a ticket of `owner` that is already
    /// queued is refused (`InvalidArgument`), since a cancel could then reach the wrong waiter.
    pub fn acquire(
        &self,
        key: &str,
        owner: OwnerId,
        ticket: u64,
        make_waiter: impl FnOnce() -> Result<GrantCallback>,
    ) -> Result<Acquire> {
        let mut state = self.state();
        if state.keys.contains_key(key) {
            if let Some(queued) = state.tickets.get(&(owner, ticket)) {
                return Err(Error::invalid(format!(
                    "lock-wait ticket {ticket} is already queued for '{queued}'; tickets must be unique"
                )));
            }
        }
        if let Some(lock) = state.keys.get_mut(key) {
            let notify = make_waiter()?;
            lock.waiters.push_back(Waiter {
                owner,
                ticket,
                notify,
            });
            state.tickets.insert((owner, ticket), key.into());
            return Ok(Acquire::Queued);
        }
        let token = next_token();
        state.keys.insert(
            key.into(),
            KeyLock {
                token,
                owner,
                waiters: VecDeque::new(),
            },
        );
        Ok(Acquire::Granted(Grant {
            token,
            after_delete: false,
        }))
    }

    /// Takes the lock only if it is free.
    #[cfg(test)]
    pub fn try_acquire(&self, key: &str, owner: OwnerId) -> Option<Grant> {
        match self.acquire(key, owner, 0, || Err(Error::Aborted)) {
            Ok(Acquire::Granted(grant)) => Some(grant),
            _ => None,
        }
    }

    /// Whether `token` is the current holder of `key`.
    pub fn holds(&self, key: &str, token: LockToken) -> bool {
        self.state()
            .keys
            .get(key)
            .is_some_and(|lock| lock.token == token)
    }

    #[cfg(feature = "etcd")]
    /// Whether anyone holds `key`'s lock.
    pub fn is_locked(&self, key: &str) -> bool {
        self.state().keys.contains_key(key)
    }

    #[cfg(feature = "etcd")]
    /// Whether anyone waits for `key`'s lock.
    pub fn has_waiters(&self, key: &str) -> bool {
        self.state()
            .keys
            .get(key)
            .is_some_and(|lock| !lock.waiters.is_empty())
    }

    /// Hands the lock to the next waiter, or frees the key. Fails if `token` does not hold it.
    pub fn release(&self, key: &str, token: LockToken, after_delete: bool) -> Result<()> {
        let handed = {
            let mut state = self.state();
            let lock = match state.keys.get_mut(key) {
                Some(lock) if lock.token == token => lock,
                _ => {
                    return Err(Error::LockReleased {
                        key: key.to_string(),
                    })
                }
            };
            match lock.waiters.pop_front() {
                Some(next) => {
                    let token = next_token();
                    lock.token = token;
                    lock.owner = next.owner;
                    state.tickets.remove(&(next.owner, next.ticket));
                    Some((next.notify, token))
                }
                None => {
                    state.keys.remove(key);
                    None
                }
            }
        };
        if let Some((notify, token)) = handed {
            notify(Ok(Grant {
                token,
                after_delete,
            }));
        }
        Ok(())
    }

    /// Removes a queued waiter, telling it `reason`. Returns false when it was already granted
    /// (or never queued): then its grant stands and the caller must use or release it.
    pub fn cancel(&self, owner: OwnerId, ticket: u64, reason: Error) -> bool {
        let waiter = {
            let mut state = self.state();
            let Some(key) = state.tickets.remove(&(owner, ticket)) else {
                return false;
            };
            let lock = state
                .keys
                .get_mut(&key)
                .expect("a queued waiter's key is locked");
            let at = lock
                .waiters
                .iter()
                .position(|w| w.owner == owner && w.ticket == ticket)
                .expect("a ticket points at its waiter");
            lock.waiters.remove(at).expect("index in range")
        };
        (waiter.notify)(Err(reason));
        true
    }

    /// Frees everything `owner` holds or waits for: its waiters hear `StoreClosed`, its locks
    /// pass to the next waiters.
    pub fn release_owner(&self, owner: OwnerId) {
        let (tickets, held): (Vec<u64>, Vec<(Box<str>, LockToken)>) = {
            let state = self.state();
            let tickets = state
                .tickets
                .keys()
                .filter(|(o, _)| *o == owner)
                .map(|(_, t)| *t)
                .collect();
            let held = state
                .keys
                .iter()
                .filter(|(_, l)| l.owner == owner)
                .map(|(k, l)| (k.clone(), l.token))
                .collect();
            (tickets, held)
        };
        for ticket in tickets {
            self.cancel(owner, ticket, Error::StoreClosed);
        }
        for (key, token) in held {
            // Another thread may have released it meanwhile; that is fine.
            let _ = self.release(&key, token, false);
        }
    }

    pub fn counts(&self) -> LockCounts {
        let state = self.state();
        LockCounts {
            held: state.keys.len() as u64,
            waiting: state.tickets.len() as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn queue(
        table: &LockTable,
        key: &str,
        owner: OwnerId,
        ticket: u64,
    ) -> mpsc::Receiver<Result<Grant>> {
        let (tx, rx) = mpsc::channel();
        let outcome = table
            .acquire(key, owner, ticket, || {
                Ok(Box::new(move |r| {
                    let _ = tx.send(r);
                }))
            })
            .unwrap();
        assert!(matches!(outcome, Acquire::Queued));
        rx
    }

    #[test]
    fn free_key_is_granted_at_once_and_record_dropped_on_release() {
        let table = LockTable::new();
        let g = table.try_acquire("a", 1).unwrap();
        assert!(table.holds("a", g.token));
        assert!(table.try_acquire("a", 2).is_none());
        table.release("a", g.token, false).unwrap();
        assert_eq!(table.counts(), LockCounts::default());
        assert!(table.release("a", g.token, false).is_err());
    }

    #[test]
    fn waiters_are_served_in_arrival_order() {
        let table = LockTable::new();
        let first = table.try_acquire("k", 1).unwrap();
        let receivers: Vec<_> = (0..100).map(|i| queue(&table, "k", 2, i)).collect();
        assert_eq!(table.counts().waiting, 100);
        let mut token = first.token;
        for (i, rx) in receivers.iter().enumerate() {
            table.release("k", token, i == 0).unwrap();
            let grant = rx.try_recv().unwrap().unwrap();
            assert_eq!(grant.after_delete, i == 0);
            assert!(table.holds("k", grant.token));
            // Nobody later in the queue has heard anything yet.
            if let Some(next) = receivers.get(i + 1) {
                assert!(next.try_recv().is_err());
            }
            token = grant.token;
        }
        table.release("k", token, false).unwrap();
        assert_eq!(table.counts(), LockCounts::default());
    }

    #[test]
    fn cancelled_waiter_leaves_no_trace_and_next_proceeds() {
        let table = LockTable::new();
        let held = table.try_acquire("k", 1).unwrap();
        let gives_up = queue(&table, "k", 2, 7);
        let patient = queue(&table, "k", 3, 8);
        assert!(table.cancel(2, 7, Error::LockTimeout { key: "k".into() }));
        assert_eq!(
            gives_up.try_recv().unwrap().unwrap_err().code(),
            crate::ErrorCode::LockTimeout
        );
        assert!(!table.cancel(2, 7, Error::Aborted));
        assert_eq!(
            table.counts(),
            LockCounts {
                held: 1,
                waiting: 1
            }
        );
        table.release("k", held.token, false).unwrap();
        let grant = patient.try_recv().unwrap().unwrap();
        assert!(
            !table.cancel(3, 8, Error::Aborted),
            "a granted waiter cannot be cancelled"
        );
        table.release("k", grant.token, false).unwrap();
        assert_eq!(table.counts(), LockCounts::default());
    }

    #[test]
    fn a_ticket_already_queued_is_refused_and_the_first_waiter_keeps_its_place() {
        let table = LockTable::new();
        let a = table.try_acquire("a", 1).unwrap();
        let b = table.try_acquire("b", 1).unwrap();
        let first = queue(&table, "a", 2, 7);
        for key in ["a", "b"] {
            let refused = table.acquire(key, 2, 7, || {
                panic!("no waiter is built for a reused ticket")
            });
            assert_eq!(
                refused.err().map(|e| e.code()),
                Some(crate::ErrorCode::InvalidArgument),
                "{key}"
            );
        }
        assert_eq!(table.counts().waiting, 1);
        // The same ticket of another owner is another wait.
        let other_owner = queue(&table, "b", 3, 7);
        // A free key is granted at once whatever the ticket: nothing is queued under it.
        let free = table.try_acquire("c", 2).unwrap();
        assert!(table.cancel(2, 7, Error::LockTimeout { key: "a".into() }));
        assert_eq!(
            first.try_recv().unwrap().unwrap_err().code(),
            crate::ErrorCode::LockTimeout
        );
        table.release("a", a.token, false).unwrap();
        table.release("b", b.token, false).unwrap();
        let granted = other_owner.try_recv().unwrap().unwrap();
        table.release("b", granted.token, false).unwrap();
        table.release("c", free.token, false).unwrap();
        assert_eq!(table.counts(), LockCounts::default());
        // Once its wait is over, a ticket may be used again.
        let c = table.try_acquire("c", 1).unwrap();
        let again = queue(&table, "c", 2, 7);
        table.release("c", c.token, false).unwrap();
        let granted = again.try_recv().unwrap().unwrap();
        table.release("c", granted.token, false).unwrap();
    }

    #[test]
    fn release_owner_frees_locks_and_rejects_its_waiters() {
        let table = LockTable::new();
        let _a = table.try_acquire("a", 1).unwrap();
        let b = table.try_acquire("b", 2).unwrap();
        let own_waiter = queue(&table, "b", 1, 1);
        let other_waiter = queue(&table, "a", 2, 1);
        table.release_owner(1);
        assert_eq!(
            own_waiter.try_recv().unwrap().unwrap_err().code(),
            crate::ErrorCode::StoreClosed
        );
        let grant = other_waiter.try_recv().unwrap().unwrap();
        assert!(table.holds("a", grant.token));
        assert!(table.holds("b", b.token));
        assert_eq!(
            table.counts(),
            LockCounts {
                held: 2,
                waiting: 0
            }
        );
    }

    #[test]
    fn a_million_keys_locked_and_released_leave_an_empty_table() {
        let table = LockTable::new();
        let grants: Vec<_> = (0..1_000_000)
            .map(|i| {
                let key = format!("key-{i}");
                let grant = table.try_acquire(&key, 1).unwrap();
                (key, grant.token)
            })
            .collect();
        assert_eq!(table.counts().held, 1_000_000);
        for (key, token) in grants {
            table.release(&key, token, false).unwrap();
        }
        assert_eq!(table.counts(), LockCounts::default());
    }

    #[test]
    fn threads_contending_for_one_key_never_overlap() {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::sync::Arc;
        let table = Arc::new(LockTable::new());
        let inside = Arc::new(AtomicBool::new(false));
        let total = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..4u64)
            .map(|owner| {
                let (table, inside, total) = (table.clone(), inside.clone(), total.clone());
                std::thread::spawn(move || {
                    for ticket in 0..500 {
                        let (tx, rx) = mpsc::channel();
                        let grant = match table
                            .acquire("hot", owner, ticket, || {
                                Ok(Box::new(move |r| {
                                    let _ = tx.send(r);
                                }))
                            })
                            .unwrap()
                        {
                            Acquire::Granted(g) => g,
                            Acquire::Queued => rx.recv().unwrap().unwrap(),
                        };
                        assert!(!inside.swap(true, Ordering::SeqCst));
                        total.fetch_add(1, Ordering::SeqCst);
                        inside.store(false, Ordering::SeqCst);
                        table.release("hot", grant.token, false).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(total.load(Ordering::SeqCst), 2000);
        assert_eq!(table.counts(), LockCounts::default());
    }
}
