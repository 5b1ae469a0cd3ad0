//! The one error type of the engine. Every variant has a stable [`ErrorCode`]; the Node binding
//! passes the code through unchanged and the TypeScript layer maps it to an error class.

use std::any::Any;
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Stable, documented error codes. The TypeScript error classes are keyed by these strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    EntryExists,
    EntryNotFound,
    EntryDeleted,
    LockReleased,
    EntryReleased,
    IllegalKey,
    LockTimeout,
    Aborted,
    Codec,
    CodecMismatch,
    DatabaseLocked,
    DatabaseCorrupt,
    StoreClosed,
    InvalidArgument,
    Io,
    LockLost,
    Unavailable,
    PermissionDenied,
    WatchOverflow,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 19] = [
        ErrorCode::EntryExists,
        ErrorCode::EntryNotFound,
        ErrorCode::EntryDeleted,
        ErrorCode::LockReleased,
        ErrorCode::EntryReleased,
        ErrorCode::IllegalKey,
        ErrorCode::LockTimeout,
        ErrorCode::Aborted,
        ErrorCode::Codec,
        ErrorCode::CodecMismatch,
        ErrorCode::DatabaseLocked,
        ErrorCode::DatabaseCorrupt,
        ErrorCode::StoreClosed,
        ErrorCode::InvalidArgument,
        ErrorCode::Io,
        ErrorCode::LockLost,
        ErrorCode::Unavailable,
        ErrorCode::PermissionDenied,
        ErrorCode::WatchOverflow,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::EntryExists => "ERR_ENTRY_EXISTS",
            ErrorCode::EntryNotFound => "ERR_ENTRY_NOT_FOUND",
            ErrorCode::EntryDeleted => "ERR_ENTRY_DELETED",
            ErrorCode::LockReleased => "ERR_LOCK_RELEASED",
            ErrorCode::EntryReleased => "ERR_ENTRY_RELEASED",
            ErrorCode::IllegalKey => "ERR_ILLEGAL_KEY",
            ErrorCode::LockTimeout => "ERR_LOCK_TIMEOUT",
            ErrorCode::Aborted => "ABORT_ERR",
            ErrorCode::Codec => "ERR_CODEC",
            ErrorCode::CodecMismatch => "ERR_CODEC_MISMATCH",
            ErrorCode::DatabaseLocked => "ERR_DATABASE_LOCKED",
            ErrorCode::DatabaseCorrupt => "ERR_DATABASE_CORRUPT",
            ErrorCode::StoreClosed => "ERR_STORE_CLOSED",
            ErrorCode::InvalidArgument => "ERR_INVALID_ARGUMENT",
            ErrorCode::Io => "ERR_IO",
            ErrorCode::LockLost => "ERR_LOCK_LOST",
            ErrorCode::Unavailable => "ERR_UNAVAILABLE",
            ErrorCode::PermissionDenied => "ERR_PERMISSION_DENIED",
            ErrorCode::WatchOverflow => "ERR_WATCH_OVERFLOW",
        }
    }
}

impl AsRef<str> for ErrorCode {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("entry '{key}' already exists")]
    EntryExists { key: String },
    #[error("entry '{key}' not found")]
    EntryNotFound { key: String },
    #[error("entry '{key}' was deleted by the previous lock holder")]
    EntryDeleted { key: String },
    #[error("the lock on '{key}' was already released")]
    LockReleased { key: String },
    #[error("illegal key: {reason}")]
    IllegalKey { reason: String },
    #[error("timed out waiting for the lock on '{key}'")]
    LockTimeout { key: String },
    #[error("the operation was aborted")]
    Aborted,
    #[error("{message}")]
    Codec { message: String },
    #[error("table '{table}' was written with codec '{stored}', not '{requested}'")]
    CodecMismatch {
        table: String,
        stored: String,
        requested: String,
    },
    /// The file is in use: by another process, or (for [`crate::check_integrity`]) by this one.
    #[error("database '{path}' is open in {holder}")]
    DatabaseLocked { path: String, holder: String },
    #[error("database '{path}' is corrupt: {detail}")]
    DatabaseCorrupt { path: String, detail: String },
    #[error("the store is closed")]
    StoreClosed,
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{message}")]
    Io {
        /// The OS error number (e.g. 28 for ENOSPC) when the failure came from the OS.
        errno: Option<i32>,
        message: String,
    },
    /// The commit's fence failed (etcd backend): the session lease expired or the lock key is
    /// gone, so another process may hold the lock. Nothing was written.
    #[error("the lock on '{key}' was lost (its etcd session expired or its lock key is gone); nothing was written")]
    LockLost { key: String },
    /// The etcd cluster gave no answer (or had no quorum) within the request timeout, or its
    /// endpoints are unreachable. The message says whether the call wrote nothing or its
    /// outcome is unknown.
    #[error("{message}")]
    Unavailable { message: String },
    /// etcd refused the credentials, or the user has no permission on the prefix.
    #[error("{message}")]
    PermissionDenied { message: String },
    /// A watch fell more changes behind than its high-water mark (or, on a cluster, its
    /// replica had to re-read the prefix and cannot replay what it missed): it ended, and the
    /// changes it had not read were dropped.
    #[error("{message}")]
    WatchOverflow { message: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::EntryExists { .. } => ErrorCode::EntryExists,
            Error::EntryNotFound { .. } => ErrorCode::EntryNotFound,
            Error::EntryDeleted { .. } => ErrorCode::EntryDeleted,
            Error::LockReleased { .. } => ErrorCode::LockReleased,
            Error::IllegalKey { .. } => ErrorCode::IllegalKey,
            Error::LockTimeout { .. } => ErrorCode::LockTimeout,
            Error::Aborted => ErrorCode::Aborted,
            Error::Codec { .. } => ErrorCode::Codec,
            Error::CodecMismatch { .. } => ErrorCode::CodecMismatch,
            Error::DatabaseLocked { .. } => ErrorCode::DatabaseLocked,
            Error::DatabaseCorrupt { .. } => ErrorCode::DatabaseCorrupt,
            Error::StoreClosed => ErrorCode::StoreClosed,
            Error::InvalidArgument(_) => ErrorCode::InvalidArgument,
            Error::Io { .. } => ErrorCode::Io,
            Error::LockLost { .. } => ErrorCode::LockLost,
            Error::Unavailable { .. } => ErrorCode::Unavailable,
            Error::PermissionDenied { .. } => ErrorCode::PermissionDenied,
            Error::WatchOverflow { .. } => ErrorCode::WatchOverflow,
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Error::InvalidArgument(message.into())
    }

    pub fn illegal_key(reason: impl Into<String>) -> Self {
        Error::IllegalKey {
            reason: reason.into(),
        }
    }

    /// An I/O error about `path`, which its message names.
    pub fn io_at(path: impl AsRef<std::path::Path>, err: std::io::Error) -> Self {
        Error::Io {
            errno: err.raw_os_error(),
            message: format!("'{}': {err}", path.as_ref().display()),
        }
    }

    pub fn codec(message: impl Into<String>) -> Self {
        Error::Codec {
            message: message.into(),
        }
    }
}

impl From<std::io::Error> for Error {
    fn from(err: std::io::Error) -> Self {
        Error::Io {
            errno: err.raw_os_error(),
            message: err.to_string(),
        }
    }
}

/// Converts any redb failure that is not handled at its call site. Storage I/O keeps its errno;
/// corruption becomes [`Error::DatabaseCorrupt`].
pub(crate) fn from_storage(path: &str, err: redb::StorageError) -> Error {
    from_redb(path, err.into())
}

/// A read past the end of the file means a page pointer points outside it: damage, not I/O.
fn from_file_io(path: &str, io: std::io::Error) -> Error {
    if io.kind() == std::io::ErrorKind::UnexpectedEof {
        Error::DatabaseCorrupt {
            path: path.to_string(),
            detail: format!("a page lies beyond the end of the file ({io})"),
        }
    } else {
        Error::io_at(path, io)
    }
}

thread_local! {
    /// redb refused I/O on this thread because an earlier one failed (see [`take_previous_io`]).
    static PREVIOUS_IO: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether redb refused I/O on this thread since the last call because an earlier read or
/// write failed — possibly another thread's read that has not told the writer yet. The writer
/// asks after a failed commit: such a commit wrote nothing, and goes through after a reopen.
pub(crate) fn take_previous_io() -> bool {
    PREVIOUS_IO.with(|seen| seen.replace(false))
}

pub(crate) fn from_redb(path: &str, err: redb::Error) -> Error {
    if matches!(err, redb::Error::PreviousIo) {
        PREVIOUS_IO.with(|seen| seen.set(true));
    }
    match err {
        redb::Error::Io(io) => from_file_io(path, io),
        redb::Error::Corrupted(detail) => Error::DatabaseCorrupt {
            path: path.to_string(),
            detail,
        },
        redb::Error::DatabaseAlreadyOpen => Error::DatabaseLocked {
            path: path.to_string(),
            holder: "another process".into(),
        },
        redb::Error::DatabaseClosed => Error::StoreClosed,
        // redb's own wording ("close and re-open the database") is advice kvstore follows itself.
        redb::Error::PreviousIo => Error::Io {
            errno: None,
            message: format!(
                "'{path}': an earlier write to the file failed; the store reopens it before the \
                 next commit (retry then)"
            ),
        },
        other => Error::Io {
            errno: None,
            message: other.to_string(),
        },
    }
}

/// redb panics on some damaged pages instead of returning an error. A read that panics is
/// reported as a corrupt database, so a damaged file never unwinds into the caller.
pub(crate) fn guard_damage<T>(path: &str, read: impl FnOnce() -> Result<T>) -> Result<T> {
    catch_unwind(AssertUnwindSafe(read)).unwrap_or_else(|panic| {
        Err(Error::DatabaseCorrupt {
            path: path.to_string(),
            detail: format!("redb failed on a damaged page: {}", panic_message(&*panic)),
        })
    })
}

pub(crate) fn panic_message(panic: &(dyn Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".into()
    }
}
