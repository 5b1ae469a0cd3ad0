//! The process-wide table of open files: one [`Shared`] core per file, whatever path, symlink or
//! hard link reaches it. Opening a file (which may include redb's crash repair) and closing it
//! (the final sync) run with the table unlocked: another thread that wants the same file
//! meanwhile waits for that file alone, then joins it or opens it afresh; other files never wait.

use std::collections::HashMap;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};

use crate::error::{Error, Result};
use crate::file::commit_queue::current_writer;
use crate::file::shared::Shared;

/// Identity of an existing file (device, inode), so two links to it find one core.
type FileId = (u64, u64);

#[cfg(unix)]
fn file_id(path: &Path) -> Option<FileId> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

#[cfg(not(unix))]
fn file_id(_path: &Path) -> Option<FileId> {
    None
}

enum Entry {
    Open {
        shared: Arc<Shared>,
        handles: usize,
        id: Option<FileId>,
    },
    /// One thread is opening or closing the file; others wait for `done`.
    Changing {
        id: Option<FileId>,
        done: Arc<Transition>,
        /// When closing: the file's writer, which runs callbacks until it stops and cannot
        /// wait for its own close to finish.
        closing_writer: u64,
    },
}

impl Entry {
    fn id(&self) -> Option<FileId> {
        match self {
            Entry::Open { id, .. } | Entry::Changing { id, .. } => *id,
        }
    }
}

#[derive(Default)]
struct Transition {
    finished: Mutex<bool>,
    cond: Condvar,
}

impl Transition {
    fn wait(&self) {
        let mut finished = self.finished.lock().unwrap_or_else(|p| p.into_inner());
        while !*finished {
            finished = self.cond.wait(finished).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn finish(&self) {
        *self.finished.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.cond.notify_all();
    }
}

fn files() -> MutexGuard<'static, HashMap<PathBuf, Entry>> {
    static TABLE: OnceLock<Mutex<HashMap<PathBuf, Entry>>> = OnceLock::new();
    TABLE
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

/// The key under which the file at `path` is registered, if it is.
fn find(table: &HashMap<PathBuf, Entry>, path: &Path, id: Option<FileId>) -> Option<PathBuf> {
    if table.contains_key(path) {
        return Some(path.to_path_buf());
    }
    let id = id?;
    table
        .iter()
        .find(|(_, entry)| entry.id() == Some(id))
        .map(|(key, _)| key.clone())
}

/// An open file as one handle sees it.
pub(crate) struct Registration {
    pub shared: Arc<Shared>,
    /// The key to give back to [`close`].
    pub key: PathBuf,
    /// This call opened the file (rather than joining a core already open).
    pub opened: bool,
}

/// Joins the core of the file at `path` (a normalized path), or opens it with `open`.
pub(crate) fn open(path: &Path, open: impl FnOnce() -> Result<Shared>) -> Result<Registration> {
    loop {
        let id = file_id(path);
        let mut table = files();
        let Some(key) = find(&table, path, id) else {
            let done = Arc::new(Transition::default());
            table.insert(
                path.to_path_buf(),
                Entry::Changing {
                    id,
                    done: done.clone(),
                    closing_writer: 0,
                },
            );
            drop(table);
            let opened = catch_unwind(AssertUnwindSafe(open));
            let mut table = files();
            let opened = match opened {
                Ok(opened) => opened.map(Arc::new),
                Err(panic) => {
                    table.remove(path);
                    drop(table);
                    done.finish();
                    resume_unwind(panic);
                }
            };
            match &opened {
                Ok(shared) => {
                    table.insert(
                        path.to_path_buf(),
                        Entry::Open {
                            shared: shared.clone(),
                            handles: 1,
                            id: file_id(path),
                        },
                    );
                }
                Err(_) => {
                    table.remove(path);
                }
            }
            drop(table);
            done.finish();
            return opened.map(|shared| Registration {
                shared,
                key: path.to_path_buf(),
                opened: true,
            });
        };
        match table.get_mut(&key).expect("found above") {
            Entry::Open {
                shared, handles, ..
            } => {
                *handles += 1;
                return Ok(Registration {
                    shared: shared.clone(),
                    key,
                    opened: false,
                });
            }
            Entry::Changing { closing_writer, .. }
                if *closing_writer != 0 && *closing_writer == current_writer() =>
            {
                return Err(Error::DatabaseLocked {
                    path: path.display().to_string(),
                    holder: "this process, which is closing it: it cannot be opened again from \
                             inside one of its own callbacks"
                        .into(),
                });
            }
            Entry::Changing { done, .. } => {
                let done = done.clone();
                drop(table);
                done.wait();
            }
        }
    }
}

/// Gives back one handle of `shared`. The last one runs `close_file` while openers of the same
/// file wait, so none of them meets the instance still holding the file lock.
pub(crate) fn close(key: &Path, shared: &Arc<Shared>, close_file: impl FnOnce()) {
    let closing = {
        let mut table = files();
        match table.get_mut(key) {
            Some(Entry::Open {
                shared: open,
                handles,
                id,
            }) if Arc::ptr_eq(open, shared) => {
                *handles -= 1;
                if *handles > 0 {
                    return;
                }
                let done = Arc::new(Transition::default());
                let id = *id;
                table.insert(
                    key.to_path_buf(),
                    Entry::Changing {
                        id,
                        done: done.clone(),
                        closing_writer: shared.queue_id(),
                    },
                );
                done
            }
            _ => return,
        }
    };
    // Settled even if closing panics, or the file's openers would wait forever.
    let _settle = Settle { key, done: closing };
    close_file();
}

struct Settle<'a> {
    key: &'a Path,
    done: Arc<Transition>,
}

impl Drop for Settle<'_> {
    fn drop(&mut self) {
        files().remove(self.key);
        self.done.finish();
    }
}

/// Whether the file at `path` is open (or being opened or closed) in this process.
pub(crate) fn is_open(path: &Path) -> bool {
    find(&files(), path, file_id(path)).is_some()
}
