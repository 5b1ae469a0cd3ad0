//! The per-file core every handle of the process shares: the open file and its writer.

use std::path::Path;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use crate::error::{Error, ErrorCode, Result};
use crate::file::commit_queue::{CommitQueue, Job};
use crate::file::storage::{DatabaseOptions, StoreFile};
use crate::file::wal::Log;

/// The per-file core shared by every handle in the process.
pub(crate) struct Shared {
    pub(crate) file: Arc<StoreFile>,
    pub(crate) queue: CommitQueue,
    /// How long redb spent repairing the file at open, after an unclean shutdown.
    pub(crate) repaired: Option<Duration>,
}

impl std::ops::Deref for Shared {
    type Target = StoreFile;

    fn deref(&self) -> &StoreFile {
        &self.file
    }
}

impl Shared {
    pub(crate) fn open(location: &Path, options: &DatabaseOptions) -> Result<Shared> {
        let (file, repaired) = StoreFile::open(location, options)?;
        // A durable store's batches are made durable by its write-ahead log.
        let log = (options.durable && !options.read_only)
            .then(|| Log::new(location, options.backend.clone()));
        let queue = CommitQueue::start(file.clone(), options.sync_interval, log)?;
        Ok(Shared {
            file,
            queue,
            repaired,
        })
    }

    /// After an I/O error on a read (a page beyond the end of the file is one), redb refuses
    /// all I/O: the writer is woken to reopen the file, so reads and commits work again as soon
    /// as the disk does.
    pub(crate) fn read_error(&self, err: &Error) {
        if matches!(err.code(), ErrorCode::Io | ErrorCode::DatabaseCorrupt) {
            self.file.mark_read_failed();
            self.queue.submit(Job::Barrier(Box::new(|| {})));
        }
    }

    /// Names this file's writer (see [`crate::file::commit_queue::current_writer`]).
    pub(crate) fn queue_id(&self) -> u64 {
        self.queue.id()
    }

    /// Returns once every job submitted before has been settled (at once on the writer itself,
    /// where waiting would never end).
    pub(crate) fn barrier(&self) {
        if self.queue.is_current_writer() {
            return;
        }
        let (tx, rx) = mpsc::channel();
        self.queue.submit(Job::Barrier(Box::new(move || {
            let _ = tx.send(());
        })));
        let _ = rx.recv();
    }
}
