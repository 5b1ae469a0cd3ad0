//! The blocking calls for Rust callers (`lock`, `next_key_blocking`), written once over the
//! callback-taking calls that both storages offer: the caller's thread waits on a channel that
//! the grant (or the leased key) is sent to.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::locks::{Acquire, Grant, GrantCallback};
use crate::map::{LockMode, LockedEntry, NextKey};

/// What a map of either storage offers the blocking calls.
pub(crate) trait Waits {
    fn acquire(
        &self,
        key: &str,
        ticket: u64,
        make_waiter: impl FnOnce() -> Result<GrantCallback>,
    ) -> Result<Acquire>;
    fn cancel_wait(&self, ticket: u64, reason: Error) -> bool;
    fn finish_acquire(&self, key: &str, grant: Grant, mode: LockMode) -> Result<LockedEntry>;
    fn next_key(
        &self,
        make_waiter: impl FnOnce() -> Box<dyn FnOnce(Result<String>) + Send>,
    ) -> Result<NextKey>;
    /// Refused when waiting on this thread would wait for the thread itself (a callback of
    /// the storage); `what` names the call.
    fn check_may_wait(&self, what: &str) -> Result<()>;
}

/// Waits for `key`'s lock (up to `timeout`) and returns the entry locked per `mode`.
pub(crate) fn lock(
    map: &impl Waits,
    key: &str,
    mode: LockMode,
    timeout: Option<Duration>,
) -> Result<LockedEntry> {
    static TICKETS: AtomicU64 = AtomicU64::new(1);
    let ticket = TICKETS.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = mpsc::channel();
    let grant = match map.acquire(key, ticket, || {
        Ok(Box::new(move |r| {
            let _ = tx.send(r);
        }))
    })? {
        Acquire::Granted(grant) => grant,
        Acquire::Queued => {
            if let Err(err) = map.check_may_wait("lock a held key") {
                if map.cancel_wait(ticket, err.clone()) {
                    return Err(err);
                }
            }
            let timed_out = || Error::LockTimeout {
                key: key.to_string(),
            };
            let received = match timeout {
                Some(t) => rx.recv_timeout(t).ok(),
                None => rx.recv().ok(),
            };
            match received {
                Some(outcome) => outcome?,
                None if map.cancel_wait(ticket, timed_out()) => return Err(timed_out()),
                // Granted just as the wait ran out: take it.
                None => rx.recv().map_err(|_| Error::StoreClosed)??,
            }
        }
    };
    map.finish_acquire(key, grant, mode)
}

/// The next auto key, waiting for a lease if needed.
pub(crate) fn next_key(map: &impl Waits) -> Result<String> {
    let (tx, rx) = mpsc::channel();
    match map.next_key(|| {
        Box::new(move |r| {
            let _ = tx.send(r);
        })
    })? {
        NextKey::Ready(key) => Ok(key),
        NextKey::Pending => {
            map.check_may_wait("wait for an auto key")?;
            rx.recv().map_err(|_| Error::StoreClosed)?
        }
    }
}
