//! What maps of every storage share: their options, lock modes, the entry a granted lock
//! reads, commit options and changes, and statistics.

use std::sync::Arc;

use crate::error::Result;
use crate::keys::KeyFormat;
use crate::locks::LockToken;

/// The entry cache's default budget: 8 MiB, some 30 000 records of 150 bytes.
pub const DEFAULT_CACHE_BYTES: usize = 8 << 20;

/// Options of one named map; the first opener of the table in a process decides the cache size.
#[derive(Debug, Clone)]
pub struct MapOptions {
    /// The codec's name, recorded in the file; a different name on a later open is refused.
    pub codec: String,
    /// The most entries the cache holds (`usize::MAX`: no cap but the budget; 0 disables it).
    pub cache_capacity: usize,
    /// The cache's budget in bytes (keys, records and a fixed cost per entry; 0 disables it).
    pub cache_bytes: usize,
    pub keys: KeyFormat,
    /// Auto-key numbers leased from the file per write.
    pub bandwidth: u64,
}

impl Default for MapOptions {
    fn default() -> Self {
        MapOptions {
            codec: "raw".into(),
            cache_capacity: usize::MAX,
            cache_bytes: DEFAULT_CACHE_BYTES,
            keys: KeyFormat::default(),
            bandwidth: 1000,
        }
    }
}

/// What a lock is taken for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// The entry must exist (`getAndLockEntry`).
    Existing,
    /// The entry must not exist (`createAndLockEntry`).
    New,
    /// Either; `existed` tells which (`allowExisting`).
    Any,
}

/// A lock that was granted, with the committed record at that moment.
#[derive(Debug, Clone)]
pub struct LockedEntry {
    pub token: LockToken,
    pub record: Option<Arc<[u8]>>,
    pub existed: bool,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct CommitOptions {
    /// Keep the lock after a successful write; the holder may commit again.
    pub update_only: bool,
    /// On failure keep the lock so the caller can retry.
    pub hold_lock_on_failure: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MapStats {
    pub entries: u64,
    pub file_bytes: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub cache_entries: u64,
    /// What the cached entries are counted at against the cache's budget in bytes.
    pub cache_bytes: u64,
    pub locks_held: u64,
    pub locks_waiting: u64,
    pub commits: u64,
    pub batches: u64,
    pub failed_batches: u64,
    pub largest_batch: u64,
    /// Non-durable transactions not yet made durable (a crash now would lose them).
    pub unsynced_batches: u64,
    /// A cluster's replica: every change up to this etcd revision is in it (`None` for a file).
    pub replica_revision: Option<i64>,
    /// How many revisions the replica may be behind the newest this process has seen (an upper
    /// bound: other prefixes' revisions count too); `None` for a file.
    pub replica_lag: Option<i64>,
    /// Watches of this map open in this process.
    pub watchers: u64,
}

/// Called exactly once with the outcome of one commit, on the writer (or on a thread writing a
/// batch inline). It must not wait for the store: the blocking calls (`lock` of a held key,
/// `EntryGuard::commit`, `compact`, waiting for an auto key) refuse there with
/// `InvalidArgument` instead of deadlocking.
pub type CommitCallback = Box<dyn FnOnce(Result<()>) + Send>;

/// What a commit writes.
pub enum Change {
    Put(Arc<[u8]>),
    Delete,
}

impl Change {
    /// The record written, or `None` for a delete.
    pub fn record(&self) -> Option<Arc<[u8]>> {
        match self {
            Change::Put(record) => Some(record.clone()),
            Change::Delete => None,
        }
    }
}

/// Outcome of `next_key` when no number was at hand.
pub enum NextKey {
    Ready(String),
    Pending,
}
