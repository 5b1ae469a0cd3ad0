//! The open redb instance of a file: writable, or read-only (`DatabaseOptions::read_only`), in
//! which case the file is opened without write access and nothing in it is ever changed.

use crate::error::{Error, Result};
use redb::ReadableDatabase;

pub(crate) enum Instance {
    Writable(redb::Database),
    ReadOnly(redb::ReadOnlyDatabase),
}

impl Instance {
    pub(crate) fn begin_read(
        &self,
    ) -> std::result::Result<redb::ReadTransaction, redb::TransactionError> {
        match self {
            Instance::Writable(db) => db.begin_read(),
            Instance::ReadOnly(db) => db.begin_read(),
        }
    }

    /// The instance to write through; a read-only one refuses, naming the file.
    pub(crate) fn writable(&self, path: &str) -> Result<&redb::Database> {
        match self {
            Instance::Writable(db) => Ok(db),
            Instance::ReadOnly(_) => Err(read_only(path)),
        }
    }

    /// redb's compaction; a read-only instance has nothing it may reclaim.
    pub(crate) fn compact(&mut self) -> std::result::Result<bool, redb::CompactionError> {
        match self {
            Instance::Writable(db) => db.compact(),
            Instance::ReadOnly(_) => Ok(false),
        }
    }

    pub(crate) fn is_read_only(&self) -> bool {
        matches!(self, Instance::ReadOnly(_))
    }
}

/// The error of every change asked of a store opened read-only.
pub(crate) fn read_only(path: &str) -> Error {
    Error::invalid(format!(
        "'{path}' is open read-only: locks, commits, auto keys and compaction are refused"
    ))
}
