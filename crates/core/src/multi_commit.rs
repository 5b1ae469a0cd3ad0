//! Several held locks, one atomic commit (`db.commit([job, claim])`): the changes of every lock
//! are written in one transaction (a file) or one fenced etcd transaction (a cluster), all or
//! none, joining group commit like any other commit. A child module of `store`, for its
//! dispatch to the storages.

use super::{Database, EntryGuard, MapStore, PreparedCommit, Storage};
use crate::error::{Error, Result};
use crate::locks::LockToken;
use crate::map::{Change, CommitCallback, CommitOptions};

/// One lock's part of a multi-lock commit: the map it was taken through, its key, the token
/// that holds it, and what to write.
pub type CommitItem = (MapStore, String, LockToken, Change);

fn another_store(key: &str) -> Error {
    Error::invalid(format!(
        "the lock on '{key}' belongs to a map of another store: one commit writes one store; \
         nothing was written"
    ))
}

impl Database {
    /// Checks a commit of several held locks, to be queued with [`Database::submit`] (alone or
    /// with other commits; it shares their transaction). Every lock must be held, of a map of
    /// this store (the same file or cluster and prefix, through any handle of this process),
    /// and named once, and no delete may come with `update_only`; otherwise
    /// [`Error::InvalidArgument`], nothing written and every lock still held. A failure found
    /// now (the handle closed, an oversize record, a lock of a cluster known lost) comes back
    /// at once, the locks released unless `hold_lock_on_failure`.
    ///
    /// Once queued, the changes are written in one transaction or not at all; `done` hears the
    /// outcome once. Then every lock is handed on (kept with `update_only`); on failure every
    /// lock is released (kept with `hold_lock_on_failure`). A cluster fails the whole commit
    /// with [`Error::LockLost`] when any of its locks was lost; a cluster commit writes at most
    /// 60 entries (etcd's limit on operations per transaction).
    pub fn prepare_group(
        &self,
        items: Vec<CommitItem>,
        options: CommitOptions,
        done: CommitCallback,
    ) -> Result<PreparedCommit> {
        match &self.0 {
            Storage::File(db) => {
                let mut parts = Vec::with_capacity(items.len());
                for (map, key, token, change) in items {
                    match map.0 {
                        Storage::File(map) => parts.push((map, key, token, change)),
                        _ => return Err(another_store(&key)),
                    }
                }
                Ok(PreparedCommit(Storage::File(
                    db.prepare_group(parts, options, done)?,
                )))
            }
            #[cfg(feature = "etcd")]
            Storage::Cluster(_) => cluster::prepare_group(items, options, done)
                .map(|joined| PreparedCommit(Storage::Cluster(joined))),
            #[cfg(not(feature = "etcd"))]
            Storage::Never(never, _) => super::absurd(never),
        }
    }

    /// [`Database::prepare_group`] and [`Database::submit`]: errors found before queueing come
    /// back at once (`done` is then not called); the outcome of the write reaches `done`.
    pub fn commit_group(
        &self,
        items: Vec<CommitItem>,
        options: CommitOptions,
        done: CommitCallback,
    ) -> Result<()> {
        let prepared = self.prepare_group(items, options, done)?;
        self.submit(vec![prepared]);
        Ok(())
    }

    /// Blocking: writes the changes of several [`EntryGuard`]s (of maps of this store) in one
    /// transaction, all or none, as [`Database::prepare_group`] describes, and leaves each guard
    /// as its own commit would: holding its lock after an `update_only` commit (with the new
    /// record) or a failure with `hold_lock_on_failure`, released otherwise (dropping it then
    /// does nothing). A guard that no longer holds its lock is [`Error::InvalidArgument`],
    /// nothing written, every lock still held.
    pub fn commit_guards(
        &self,
        items: Vec<(&mut EntryGuard, Change)>,
        options: CommitOptions,
    ) -> Result<()> {
        match &self.0 {
            Storage::File(db) => {
                let mut guards = Vec::with_capacity(items.len());
                for (guard, change) in items {
                    let key = guard.key().to_string();
                    match &mut guard.0 {
                        Storage::File(guard) => guards.push((guard, change)),
                        _ => return Err(another_store(&key)),
                    }
                }
                db.commit_guards(guards, options)
            }
            #[cfg(feature = "etcd")]
            Storage::Cluster(_) => cluster::commit_guards(self, items, options),
            #[cfg(not(feature = "etcd"))]
            Storage::Never(never, _) => super::absurd(never),
        }
    }
}

#[cfg(feature = "etcd")]
mod cluster {
    use std::collections::HashSet;
    use std::sync::mpsc;

    use super::{another_store, CommitItem};
    use crate::error::{Error, Result};
    use crate::etcd::{ClusterCommit, ClusterMap};
    use crate::map::{Change, CommitCallback, CommitOptions};
    use crate::store::{Database, EntryGuard, MapStore, Storage};

    /// One nested etcd transaction: the fences of every lock, then every write
    /// ([`ClusterCommit::join`]). Locks of another core are refused when it is submitted
    /// (InvalidArgument, nothing written, the locks still held).
    pub(super) fn prepare_group(
        items: Vec<CommitItem>,
        options: CommitOptions,
        done: CommitCallback,
    ) -> Result<ClusterCommit> {
        let mut maps: Vec<(ClusterMap, String, u64, Change)> = Vec::with_capacity(items.len());
        let mut seen = HashSet::new();
        for (map, key, token, change) in items {
            let Storage::Cluster(map) = map.0 else {
                return Err(another_store(&key));
            };
            if matches!(change, Change::Delete) && options.update_only {
                return Err(Error::invalid(
                    "commit cannot both delete and keep the lock (delete with updateOnly): nothing was written",
                ));
            }
            if !seen.insert((map.name().to_string(), key.clone())) {
                return Err(Error::invalid(format!(
                    "the lock on '{key}' of map '{}' is named twice in one commit: nothing \
                     was written",
                    map.name()
                )));
            }
            maps.push((map, key, token, change));
        }
        let locks: Vec<(ClusterMap, String, u64)> = maps
            .iter()
            .map(|(map, key, token, _)| (map.clone(), key.clone(), *token))
            .collect();
        // Prepared holding on failure, so that a refusal releases nothing; the caller's choice
        // is set on the joined commit.
        let hold = CommitOptions {
            hold_lock_on_failure: true,
            ..options
        };
        let mut done = Some(done);
        let mut prepared = Vec::with_capacity(maps.len());
        for (map, key, token, change) in maps {
            // The joined commit's callbacks all hear its one outcome: the caller's goes first.
            let callback = done.take().unwrap_or_else(|| Box::new(|_| {}));
            match map.prepare_commit(&key, token, change, hold, callback) {
                Ok(commit) => prepared.push(commit),
                Err(Error::LockReleased { .. }) => {
                    return Err(Error::invalid(format!(
                        "the lock on '{key}' of map '{}' is not held (committed or released): \
                         nothing was written",
                        map.name()
                    )));
                }
                Err(err) => {
                    if !options.hold_lock_on_failure {
                        for (map, key, token) in &locks {
                            let _ = map.release(key, *token);
                        }
                    }
                    return Err(err);
                }
            }
        }
        let mut joined = ClusterCommit::join(prepared);
        for write in &mut joined.writes {
            write.hold_on_failure = options.hold_lock_on_failure;
        }
        if let Some(err) = joined.refused.take() {
            // Too many entries, or one twice: nothing written, every lock still held.
            return Err(err);
        }
        Ok(joined)
    }

    pub(super) fn commit_guards(
        db: &Database,
        items: Vec<(&mut EntryGuard, Change)>,
        options: CommitOptions,
    ) -> Result<()> {
        if tokio::runtime::Handle::try_current().is_ok() {
            return Err(Error::invalid(
                "cannot commit and wait on a thread of the etcd backend's runtime (inside a \
                 callback): use commit_group",
            ));
        }
        let mut parts = Vec::with_capacity(items.len());
        let mut written = Vec::with_capacity(items.len());
        let mut guards = Vec::with_capacity(items.len());
        for (guard, change) in items {
            let key = guard.key().to_string();
            let token = guard.token();
            let Storage::Cluster(inner) = &mut guard.0 else {
                return Err(another_store(&key));
            };
            let Some(map) = inner.map_if_held() else {
                return Err(Error::invalid(format!(
                    "the lock on '{key}' is not held (committed or released): nothing was written"
                )));
            };
            written.push(change.record());
            parts.push((MapStore(Storage::Cluster(map.clone())), key, token, change));
            guards.push(inner);
        }
        let (tx, rx) = mpsc::channel();
        let outcome = db
            .commit_group(
                parts,
                options,
                Box::new(move |r| {
                    let _ = tx.send(r);
                }),
            )
            .and_then(|()| rx.recv().map_err(|_| Error::StoreClosed)?);
        for (guard, record) in guards.into_iter().zip(written) {
            guard.group_committed(&outcome, options, record);
        }
        outcome
    }
}
