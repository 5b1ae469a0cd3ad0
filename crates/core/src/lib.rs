//! kvstore-core: an embedded key/value engine over [redb] for services that keep one record per
//! key and update it from many concurrent tasks. It owns per-key FIFO locks, a bounded entry
//! cache, auto-generated keys leased from the file, and a single writer that commits every
//! pending change in one transaction (group commit). The Node binding is a thin layer over it.
//!
//! ```no_run
//! use kvstore_core::{Database, DatabaseOptions, MapOptions, LockMode, envelope};
//! let db = Database::open("/tmp/jobs.redb", DatabaseOptions::default())?;
//! let jobs = db.map_store("jobs", MapOptions::default())?;
//! let guard = jobs.lock("job-1", LockMode::New, None)?;
//! guard.commit(envelope::encode(&[("path".into(), "/data/x".into())], b"queued"))?;
//! assert_eq!(jobs.get_record("job-1")?.unwrap().value, b"queued");
//! db.close();
//! # Ok::<(), kvstore_core::Error>(())
//! ```

mod blocking;
mod cache;
pub mod envelope;
mod error;
#[cfg(feature = "etcd")]
pub mod etcd;
mod file;
mod keys;
mod locks;
mod map;
mod range;
mod sequence;
mod store;
pub mod typed;
mod watch;

pub use cache::CacheCounts;
pub use envelope::Record;
pub use error::{Error, ErrorCode, Result};
pub use file::storage::{Backend, DatabaseOptions, FORMAT_VERSION, MAX_RECORD_BYTES};
pub use file::store::check_integrity;
pub use keys::{validate_key, KeyFormat, MAX_KEY_BYTES};
pub use locks::{Acquire, Grant, GrantCallback, LockCounts, LockToken, OwnerId};
pub use map::{
    Change, CommitCallback, CommitOptions, LockMode, LockedEntry, MapOptions, MapStats, NextKey,
    DEFAULT_CACHE_BYTES,
};
pub use range::{EntryRange, RangeOptions, RawEntry};
pub use store::{Backup, CommitItem, Database, EntryGuard, MapStore, PreparedCommit};
pub use watch::{WatchEvent, WatchNext, WatchOptions, WatchWaker, Watcher};
