//! Shared by the integration tests: a storage backend over the real file that fails reads,
//! writes or fsyncs on demand (EIO, ENOSPC), and stores written with known entries.
// Each test file uses its own part of this.
#![allow(dead_code)]

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use kvstore_core::{envelope, Backend, Database, DatabaseOptions, LockMode, MapOptions, MapStore};
use redb::backends::FileBackend;
use redb::StorageBackend;

pub const EIO: i32 = 5;
pub const ENOSPC: i32 = 28;

/// One kind of call that can be made to fail: after `after` more successful calls, every
/// call fails with `errno` until cleared (errno 0).
#[derive(Debug, Default)]
pub struct Fault {
    errno: AtomicI32,
    after: AtomicU64,
}

impl Fault {
    /// Fails from the next call on.
    pub fn set(&self, errno: i32) {
        self.fail_after(0, errno);
    }

    /// Lets `calls` more calls through, then fails every call.
    pub fn fail_after(&self, calls: u64, errno: i32) {
        self.after.store(calls, Ordering::SeqCst);
        self.errno.store(errno, Ordering::SeqCst);
    }

    pub fn clear(&self) {
        self.errno.store(0, Ordering::SeqCst);
    }

    pub fn check(&self) -> std::io::Result<()> {
        let errno = self.errno.load(Ordering::SeqCst);
        if errno == 0 {
            return Ok(());
        }
        let passed = self
            .after
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if passed {
            Ok(())
        } else {
            Err(std::io::Error::from_raw_os_error(errno))
        }
    }
}

/// The calls of a [`Faulty`] backend that can fail.
#[derive(Debug, Default)]
pub struct Faults {
    pub read: Fault,
    pub write: Fault,
    pub sync: Fault,
}

/// Forwards redb's file-lock calls to the `FileBackend` in field `$file`, so a test backend
/// holds the file lock as a plain file does.
#[macro_export]
macro_rules! forward_file_lock {
    ($file:ident) => {
        fn try_lock_range(
            &self,
            start: std::ops::Bound<u64>,
            end: std::ops::Bound<u64>,
        ) -> Result<bool, redb::BackendError> {
            self.$file.try_lock_range(start, end)
        }
        fn try_lock_shared_range(
            &self,
            start: std::ops::Bound<u64>,
            end: std::ops::Bound<u64>,
        ) -> Result<bool, redb::BackendError> {
            self.$file.try_lock_shared_range(start, end)
        }
        fn lock_range(
            &self,
            start: std::ops::Bound<u64>,
            end: std::ops::Bound<u64>,
        ) -> Result<(), redb::BackendError> {
            self.$file.lock_range(start, end)
        }
        fn lock_shared_range(
            &self,
            start: std::ops::Bound<u64>,
            end: std::ops::Bound<u64>,
        ) -> Result<(), redb::BackendError> {
            self.$file.lock_shared_range(start, end)
        }
        fn unlock_range(
            &self,
            start: std::ops::Bound<u64>,
            end: std::ops::Bound<u64>,
        ) -> Result<(), redb::BackendError> {
            self.$file.unlock_range(start, end)
        }
        fn query_lock_range(
            &self,
            start: std::ops::Bound<u64>,
            end: std::ops::Bound<u64>,
        ) -> Result<bool, redb::BackendError> {
            self.$file.query_lock_range(start, end)
        }
    };
}

/// The real file, failing per [`Faults`].
#[derive(Debug)]
pub struct Faulty {
    file: FileBackend,
    faults: Arc<Faults>,
}

impl StorageBackend for Faulty {
    fn len(&self) -> std::io::Result<u64> {
        self.file.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        self.faults.read.check()?;
        self.file.read(offset, out)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.faults.write.check()?;
        self.file.set_len(len)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.faults.sync.check()?;
        self.file.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.faults.write.check()?;
        self.file.write(offset, data)
    }
    fn close(&self) -> std::io::Result<()> {
        self.file.close()
    }
    // The file lock too, so these tests see what a second open of a held file does.
    forward_file_lock!(file);
}

/// The space left on a [`FillingDisk`]: one write fails with ENOSPC when `full_once` is armed;
/// after `syncs_left` more syncs (`usize::MAX`: never) the disk is full for good (every write,
/// resize and sync fails).
#[derive(Debug)]
pub struct DiskSpace {
    pub full_once: AtomicBool,
    pub syncs_left: AtomicUsize,
    pub full: AtomicBool,
}

impl Default for DiskSpace {
    fn default() -> Self {
        DiskSpace {
            full_once: AtomicBool::new(false),
            syncs_left: AtomicUsize::new(usize::MAX),
            full: AtomicBool::new(false),
        }
    }
}

fn no_space() -> std::io::Error {
    std::io::Error::from_raw_os_error(ENOSPC)
}

/// The real file on a disk that fills up as its [`DiskSpace`] says.
#[derive(Debug)]
pub struct FillingDisk {
    pub file: FileBackend,
    pub space: Arc<DiskSpace>,
}

impl StorageBackend for FillingDisk {
    fn len(&self) -> std::io::Result<u64> {
        self.file.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        self.file.read(offset, out)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        if self.space.full.load(Ordering::SeqCst) {
            return Err(no_space());
        }
        self.file.set_len(len)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        if self.space.full.load(Ordering::SeqCst) {
            return Err(no_space());
        }
        self.file.sync_data()?;
        let left = self.space.syncs_left.load(Ordering::SeqCst);
        if left != usize::MAX {
            if left <= 1 {
                self.space.full.store(true, Ordering::SeqCst);
            }
            self.space
                .syncs_left
                .store(left.saturating_sub(1), Ordering::SeqCst);
        }
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        if self.space.full.load(Ordering::SeqCst)
            || self.space.full_once.swap(false, Ordering::SeqCst)
        {
            return Err(no_space());
        }
        self.file.write(offset, data)
    }
    fn close(&self) -> std::io::Result<()> {
        self.file.close()
    }
}

/// Opens (creating) the file a test backend stores into.
pub fn open_file(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
}

/// A backend over the real file that fails as `faults` says.
pub fn faulty(faults: Arc<Faults>) -> Backend {
    Backend(Arc::new(move |path: &Path| {
        let file = FileBackend::new(open_file(path)?).map_err(std::io::Error::other)?;
        Ok(Box::new(Faulty {
            file,
            faults: faults.clone(),
        }) as Box<dyn StorageBackend>)
    }))
}

pub fn put(map: &MapStore, key: &str, value: &[u8]) -> kvstore_core::Result<()> {
    map.lock(key, LockMode::Any, None)?
        .commit(envelope::encode(&[], value))
}

/// A closed store `name` in `dir` whose map `m` holds `key-00000`… (`n` entries of 100 bytes).
pub fn written_store(dir: &Path, name: &str, n: usize) -> PathBuf {
    let path = dir.join(name);
    let db = Database::open(&path, DatabaseOptions::default()).unwrap();
    let map = db.map_store("m", MapOptions::default()).unwrap();
    for i in 0..n {
        put(&map, &format!("key-{i:05}"), &[i as u8; 100]).unwrap();
    }
    db.close();
    path
}

/// Opens `path` over a [`faulty`] backend.
pub fn open_faulty(path: &Path, faults: &Arc<Faults>) -> Database {
    Database::open(
        path,
        DatabaseOptions {
            backend: Some(faulty(faults.clone())),
            ..Default::default()
        },
    )
    .unwrap()
}

/// redb panics on some damaged pages: the panics come from its own source files, and are
/// silenced here so the test output stays readable. Others still print.
pub fn quiet_redb_panics() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let from_redb = info
            .location()
            .is_some_and(|at| at.file().contains("/redb-"));
        if !from_redb {
            default(info);
        }
    }));
}

/// `good` with 8 bytes flipped at offsets drawn from `seed` (which advances): the same damaged
/// files on every run.
pub fn flip_bytes(good: &[u8], seed: &mut u64) -> Vec<u8> {
    let mut bytes = good.to_vec();
    for _ in 0..8 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let at = (*seed >> 33) as usize % bytes.len();
        bytes[at] ^= 0xff;
    }
    bytes
}
