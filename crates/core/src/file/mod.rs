//! The file storage: one redb file, used by one process. The per-file core (`store`) is shared
//! by every handle of the process (`registry`); one writer thread commits every pending change
//! in one transaction (`commit_queue`), made durable by its write-ahead log (`wal`); backups and compaction (`maintenance`).

pub(crate) mod backups;
pub(crate) mod commit_queue;
pub(crate) mod instance;
pub(crate) mod maintenance;
pub(crate) mod registry;
pub(crate) mod shared;
pub(crate) mod storage;
pub(crate) mod store;
pub(crate) mod unsynced;
pub(crate) mod wal;
