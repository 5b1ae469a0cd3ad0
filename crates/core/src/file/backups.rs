//! The backups running on one file, so that closing or reopening the file ends them first.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};

use crate::error::{Error, Result};
use crate::file::instance::Instance;

/// The backups of one file. Closing the file, or reopening it after an I/O error, ends them
/// first: a copy under way is stopped and waited for (it holds the redb instance, and with it
/// the file lock), and a backup begun but not yet run fails when run. Compaction refuses while
/// any backup is begun.
#[derive(Default)]
pub(crate) struct BackupGate {
    state: Mutex<GateState>,
    ended: Condvar,
    /// Bumped to end every backup; each compares it with the value it began under.
    epoch: AtomicU64,
}

#[derive(Default)]
struct GateState {
    /// Backups begun and not yet dropped.
    begun: usize,
    /// Backups copying now (each holds the instance).
    running: usize,
    /// Why the backups of an earlier epoch were ended.
    reason: Option<Error>,
}

impl BackupGate {
    fn state(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn begun(&self) -> usize {
        self.state().begun
    }

    /// Ends every backup with `reason` and waits until no copy holds the instance.
    pub(crate) fn end_all(&self, reason: Error) {
        let mut state = self.state();
        if state.begun == 0 {
            return;
        }
        state.reason = Some(reason);
        self.epoch.fetch_add(1, Ordering::SeqCst);
        while state.running > 0 {
            state = self.ended.wait(state).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Call with the instance slot locked (see `StoreFile::db_for_backup`), so a close or
    /// recovery, which takes the slot first, either ends this backup or is not yet begun.
    pub(crate) fn enter(self: &Arc<Self>, db: &Arc<Instance>) -> BackupTicket {
        self.state().begun += 1;
        BackupTicket {
            gate: self.clone(),
            epoch: self.epoch.load(Ordering::SeqCst),
            db: Arc::downgrade(db),
        }
    }
}

/// One begun backup's place in its file's [`BackupGate`]. It holds the instance only weakly
/// until the copy starts, so closing the store never waits for a backup that is not running.
pub(crate) struct BackupTicket {
    gate: Arc<BackupGate>,
    epoch: u64,
    db: Weak<Instance>,
}

impl BackupTicket {
    fn ended(&self, state: &GateState) -> Option<Error> {
        (self.gate.epoch.load(Ordering::SeqCst) != self.epoch)
            .then(|| state.reason.clone().unwrap_or(Error::StoreClosed))
    }

    /// Fails once the backup has been ended by a close or a recovery.
    pub(crate) fn check(&self) -> Result<()> {
        self.ended(&self.gate.state()).map_or(Ok(()), Err)
    }

    /// Starts the copy: the instance, held until the returned guard drops.
    pub(crate) fn start(&self) -> Result<Copying<'_>> {
        let mut state = self.gate.state();
        if let Some(err) = self.ended(&state) {
            return Err(err);
        }
        let db = self.db.upgrade().ok_or(Error::StoreClosed)?;
        state.running += 1;
        Ok(Copying {
            ticket: self,
            _db: Some(db),
        })
    }
}

impl Drop for BackupTicket {
    fn drop(&mut self) {
        self.gate.state().begun -= 1;
    }
}

/// A copy under way; dropping it lets go of the instance and wakes a close that waits.
pub(crate) struct Copying<'a> {
    ticket: &'a BackupTicket,
    _db: Option<Arc<Instance>>,
}

impl Drop for Copying<'_> {
    fn drop(&mut self) {
        let gate = &self.ticket.gate;
        let mut state = gate.state();
        // Let go of the instance before the count says so.
        drop(self._db.take());
        state.running -= 1;
        gate.ended.notify_all();
    }
}
