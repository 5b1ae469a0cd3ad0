//! The write-ahead log of a durable store: `<file>-wal` beside the redb file (symlinks
//! resolved). A durable batch is one record appended to it and `fdatasync`ed — one sequential
//! write into space written before, whatever the keys — while redb commits the batch without a
//! sync; a checkpoint (a durable redb commit, every `syncIntervalMs` at most, or when the log is
//! full) makes redb hold everything and starts the log over under a new tag. A reopen after a
//! crash replays the records of the live tag. Layout: FORMAT.md, "The write-ahead log".

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::hash::BuildHasher;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use redb::{ReadableDatabase, ReadableTable, TableDefinition, TableError};

use crate::error::{from_redb, Error, Result};
use crate::file::storage::{Backend, FORMAT_KEY, FORMAT_VERSION, META_TABLE};

/// Meta key holding the tag (u64 little-endian) of the live log; absent: no record of the log
/// is to be replayed.
pub(crate) const WAL_KEY: &str = "wal";

const MAGIC: u32 = u32::from_le_bytes(*b"KVWL");
/// magic u32, body length u32, tag u64, sequence number u64, CRC-32 u32, reserved u32 (zero).
const HEADER: usize = 32;
const PUT: u8 = 1;
const DELETE: u8 = 2;
/// Space written ahead when the log is created; it doubles up to [`MAX_CAPACITY`].
const FIRST_CAPACITY: u64 = 256 << 10;
/// A log this full is checkpointed instead of grown, and a batch larger than this is a
/// checkpoint: the log stays small beside a small store, and a checkpoint (~2 ms) comes at
/// most every ~5 000 commits of ~200 bytes.
const MAX_CAPACITY: u64 = 1 << 20;

/// One change of a batch: put `value` (or delete) `key` in the redb table `table`.
pub(crate) struct Op<'a> {
    pub table: &'a str,
    pub key: &'a str,
    pub value: Option<Cow<'a, [u8]>>,
}

/// Applies `ops` in order to a write transaction.
pub(crate) fn apply(txn: &redb::WriteTransaction, ops: &[Op<'_>], path: &str) -> Result<()> {
    let err = |e: redb::Error| from_redb(path, e);
    let mut tables: HashMap<&str, redb::Table<&str, &[u8]>> = HashMap::new();
    for op in ops {
        if !tables.contains_key(op.table) {
            let table = txn
                .open_table(TableDefinition::<&str, &[u8]>::new(op.table))
                .map_err(|e| err(e.into()))?;
            tables.insert(op.table, table);
        }
        let table = tables.get_mut(op.table).expect("opened above");
        match &op.value {
            Some(value) => table.insert(op.key, &**value).map(drop),
            None => table.remove(op.key).map(drop),
        }
        .map_err(|e| err(e.into()))?;
    }
    Ok(())
}

/// Where the log of the store at `location` lives.
pub(crate) fn log_path(location: &Path) -> PathBuf {
    let real = std::fs::canonicalize(location).unwrap_or_else(|_| location.to_path_buf());
    let mut name = real.into_os_string();
    name.push("-wal");
    PathBuf::from(name)
}

/// A new tag, unlike any before it (random per process, then counted).
pub(crate) fn fresh_tag() -> u64 {
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let n = COUNT.fetch_add(1, Ordering::Relaxed);
    std::collections::hash_map::RandomState::new().hash_one((n, std::process::id())) | 1
}

/// The length of the record of `ops`, header included.
fn record_len(ops: &[Op<'_>]) -> u64 {
    let body: usize = ops
        .iter()
        .map(|op| {
            1 + 4 + op.table.len() + 4 + op.key.len() + op.value.as_ref().map_or(0, |v| 8 + v.len())
        })
        .sum();
    (HEADER + body) as u64
}

/// The record of `ops`; its length is at most [`MAX_CAPACITY`] (see [`Log::append`]).
fn encode(ops: &[Op<'_>], tag: u64, seq: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(record_len(ops) as usize);
    out.resize(HEADER, 0);
    for op in ops {
        out.push(if op.value.is_some() { PUT } else { DELETE });
        out.extend_from_slice(&(op.table.len() as u32).to_le_bytes());
        out.extend_from_slice(op.table.as_bytes());
        out.extend_from_slice(&(op.key.len() as u32).to_le_bytes());
        out.extend_from_slice(op.key.as_bytes());
        if let Some(value) = &op.value {
            out.extend_from_slice(&(value.len() as u64).to_le_bytes());
            out.extend_from_slice(value);
        }
    }
    let body = (out.len() - HEADER) as u32;
    out[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    out[4..8].copy_from_slice(&body.to_le_bytes());
    out[8..16].copy_from_slice(&tag.to_le_bytes());
    out[16..24].copy_from_slice(&seq.to_le_bytes());
    let crc = checksum(&out[4..24], &out[HEADER..]);
    out[24..28].copy_from_slice(&crc.to_le_bytes());
    out
}

fn checksum(header: &[u8], body: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(header);
    hasher.update(body);
    hasher.finalize()
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

/// The bodies of the records of `tag`, in order from the start: the first record that is torn,
/// of another tag, out of sequence or fails its checksum ends the log.
fn records(log: &[u8], tag: u64) -> Vec<&[u8]> {
    let mut found = Vec::new();
    let mut at = 0usize;
    while let Some(header) = log.get(at..at + HEADER) {
        let len = u32_at(header, 4) as usize;
        let whole = u32_at(header, 0) == MAGIC
            && u64_at(header, 8) == tag
            && u64_at(header, 16) == found.len() as u64
            && u32_at(header, 28) == 0;
        let Some(body) = log.get(at + HEADER..at + HEADER + len).filter(|_| whole) else {
            break;
        };
        if checksum(&header[4..24], body) != u32_at(header, 24) {
            break;
        }
        found.push(body);
        at += HEADER + len;
    }
    found
}

/// The changes of one record's body.
fn decode<'a>(body: &'a [u8], path: &str) -> Result<Vec<Op<'a>>> {
    let corrupt = || Error::DatabaseCorrupt {
        path: path.to_string(),
        detail: "a record of its write-ahead log passed its checksum but cannot be read".into(),
    };
    let mut ops = Vec::new();
    let mut at = 0usize;
    let take = |at: &mut usize, n: usize| -> Result<&'a [u8]> {
        let end = at.checked_add(n).ok_or_else(corrupt)?;
        let bytes = body.get(*at..end).ok_or_else(corrupt)?;
        *at += n;
        Ok(bytes)
    };
    let text =
        |bytes: &'a [u8]| -> Result<&'a str> { std::str::from_utf8(bytes).map_err(|_| corrupt()) };
    while at < body.len() {
        let kind = take(&mut at, 1)?[0];
        let len = u32_at(take(&mut at, 4)?, 0) as usize;
        let table = text(take(&mut at, len)?)?;
        let len = u32_at(take(&mut at, 4)?, 0) as usize;
        let key = text(take(&mut at, len)?)?;
        let value = match kind {
            PUT => {
                let len = usize::try_from(u64_at(take(&mut at, 8)?, 0)).map_err(|_| corrupt())?;
                Some(Cow::Borrowed(take(&mut at, len)?))
            }
            DELETE => None,
            _ => return Err(corrupt()),
        };
        ops.push(Op { table, key, value });
    }
    Ok(ops)
}

/// The live tag recorded in the file, if any.
fn live_tag(
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
    path: &str,
) -> Result<Option<u64>> {
    let err = |e: redb::Error| from_redb(path, e);
    Ok(meta
        .get(WAL_KEY)
        .map_err(|e| err(e.into()))?
        .map(|g| g.value().get(..8).map_or(0, |b| u64_at(b, 0))))
}

/// The log's bytes (through the store's backend when it has one); an absent log is empty.
fn read_log(location: &Path, backend: Option<&Backend>) -> Result<Vec<u8>> {
    let log = log_path(location);
    let read = match backend {
        Some(make) if std::fs::symlink_metadata(&log).is_ok() => (make.0)(&log).and_then(|b| {
            let mut bytes = vec![0u8; usize::try_from(b.len()?).map_err(std::io::Error::other)?];
            b.read(0, &mut bytes)?;
            Ok(bytes)
        }),
        _ => std::fs::read(&log),
    };
    match read {
        Ok(bytes) => Ok(bytes),
        // A log that cannot exist (its name too long) holds nothing.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound || name_too_long(&e) => Ok(Vec::new()),
        Err(e) => Err(Error::io_at(&log, e)),
    }
}

#[cfg(unix)]
fn name_too_long(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENAMETOOLONG)
}

#[cfg(not(unix))]
fn name_too_long(_: &std::io::Error) -> bool {
    false
}

/// At a writable open: applies the records of the live log (if any) in one durable transaction
/// that also retires it. Returns how many batches were replayed. Replaying is idempotent: each
/// record holds whole values, applied in order.
pub(crate) fn replay(
    db: &redb::Database,
    location: &Path,
    backend: Option<&Backend>,
    path: &str,
) -> Result<usize> {
    let err = |e: redb::Error| from_redb(path, e);
    let tag = {
        let txn = db.begin_read().map_err(|e| err(e.into()))?;
        match txn.open_table(META_TABLE) {
            Ok(meta) => live_tag(&meta, path)?,
            Err(TableError::TableDoesNotExist(_)) => None,
            Err(e) => return Err(err(e.into())),
        }
    };
    let Some(tag) = tag else {
        return Ok(0);
    };
    let log = read_log(location, backend)?;
    let bodies = records(&log, tag);
    let txn = db.begin_write().map_err(|e| err(e.into()))?;
    for body in &bodies {
        apply(&txn, &decode(body, path)?, path)?;
    }
    {
        let mut meta = txn.open_table(META_TABLE).map_err(|e| err(e.into()))?;
        meta.remove(WAL_KEY).map_err(|e| err(e.into()))?;
        meta.insert(FORMAT_KEY, FORMAT_VERSION.to_le_bytes().as_slice())
            .map_err(|e| err(e.into()))?;
    }
    txn.commit().map_err(|e| err(e.into()))?;
    Ok(bodies.len())
}

/// For a read-only open: whether the live log holds records the file does not (it must be
/// replayed by a read-write open first).
pub(crate) fn needs_replay(
    txn: &redb::ReadTransaction,
    location: &Path,
    backend: Option<&Backend>,
    path: &str,
) -> Result<bool> {
    let meta = match txn.open_table(META_TABLE) {
        Ok(meta) => meta,
        Err(TableError::TableDoesNotExist(_)) => return Ok(false),
        Err(e) => return Err(from_redb(path, e.into())),
    };
    let Some(tag) = live_tag(&meta, path)? else {
        return Ok(false);
    };
    Ok(!records(&read_log(location, backend)?, tag).is_empty())
}

/// The log file, through the store's backend when it has one (tests inject faults there).
enum LogFile {
    Plain(File),
    Backend(Box<dyn redb::StorageBackend>),
}

#[cfg(unix)]
fn write_at(file: &File, bytes: &[u8], at: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(file, bytes, at)
}

#[cfg(unix)]
fn read_at(file: &File, out: &mut [u8], at: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, out, at)
}

#[cfg(windows)]
fn write_at(file: &File, mut bytes: &[u8], mut at: u64) -> std::io::Result<()> {
    while !bytes.is_empty() {
        let n = std::os::windows::fs::FileExt::seek_write(file, bytes, at)?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        bytes = &bytes[n..];
        at += n as u64;
    }
    Ok(())
}

#[cfg(windows)]
fn read_at(file: &File, mut out: &mut [u8], mut at: u64) -> std::io::Result<()> {
    while !out.is_empty() {
        let n = std::os::windows::fs::FileExt::seek_read(file, out, at)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        out = &mut out[n..];
        at += n as u64;
    }
    Ok(())
}

/// Makes the directory entry of `path` durable (POSIX: a new file's name survives a power loss
/// only once its directory is synced). Windows has no such step.
#[cfg(unix)]
fn sync_dir(path: &Path) -> std::io::Result<()> {
    match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

#[cfg(not(unix))]
fn sync_dir(_path: &Path) -> std::io::Result<()> {
    Ok(())
}

/// Below this much free space on the store's disk, batches are durable redb commits instead
/// of log records: between checkpoints redb cannot reuse the pages its commits free, so the
/// file grows there, and a write that finds the disk full leaves redb unable to go on until the
/// file is reopened (which needs room too). A durable commit reuses freed pages at once.
const LOW_SPACE: u64 = 64 << 20;

/// Whether the disk holding `path` has less than [`LOW_SPACE`] free (false when unknown).
#[cfg(unix)]
pub(crate) fn space_is_low(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(name) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    let mut stats: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a statvfs the call fills in.
    if unsafe { libc::statvfs(name.as_ptr(), &mut stats) } != 0 {
        return false;
    }
    (stats.f_bavail as u64).saturating_mul(stats.f_frsize as u64) < LOW_SPACE
}

#[cfg(not(unix))]
pub(crate) fn space_is_low(_path: &Path) -> bool {
    false
}

impl LogFile {
    fn write(&self, at: u64, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            LogFile::Plain(file) => write_at(file, bytes, at),
            LogFile::Backend(backend) => backend.write(at, bytes),
        }
    }

    fn sync(&self) -> std::io::Result<()> {
        match self {
            LogFile::Plain(file) => file.sync_data(),
            LogFile::Backend(backend) => backend.sync_data(),
        }
    }

    fn len(&self) -> std::io::Result<u64> {
        match self {
            LogFile::Plain(file) => file.metadata().map(|m| m.len()),
            LogFile::Backend(backend) => backend.len(),
        }
    }

    /// Whether it begins as a log does: empty, zeros or a record.
    fn starts_as_log(&self) -> std::io::Result<bool> {
        if self.len()? < 4 {
            return Ok(self.len()? == 0);
        }
        let mut first = [0u8; 4];
        match self {
            LogFile::Plain(file) => read_at(file, &mut first, 0)?,
            LogFile::Backend(backend) => backend.read(0, &mut first)?,
        }
        let first = u32::from_le_bytes(first);
        Ok(first == 0 || first == MAGIC)
    }
}

/// What [`Log::append`] did with a batch.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Appended {
    /// Written (and synced, when asked).
    Logged,
    /// The log cannot take it (it is not live, could not be created, or is full): the batch
    /// must be a checkpoint.
    No,
}

/// The writer's end of the log.
pub(crate) struct Log {
    path: PathBuf,
    backend: Option<Backend>,
    file: Option<LogFile>,
    /// The file could not be opened: this instance commits through redb alone.
    unavailable: bool,
    /// Bytes written ahead (zeros or old records): appends within them change no metadata.
    capacity: u64,
    /// Where the next record goes.
    end: u64,
    seq: u64,
    /// The live tag; None until the first checkpoint, and after a failure (whatever the log
    /// holds then must not be replayed: the next checkpoint starts it over under a new tag).
    tag: Option<u64>,
    /// Where the record of the batch being committed began, until redb committed it: revoked
    /// when redb's commit fails.
    pending: Option<u64>,
    /// The file's meta table may name a tag (a checkpoint recorded one): the last checkpoint
    /// must retire it.
    recorded: bool,
}

impl Log {
    pub fn new(location: &Path, backend: Option<Backend>) -> Log {
        Log {
            path: log_path(location),
            backend,
            file: None,
            unavailable: false,
            capacity: 0,
            end: 0,
            seq: 0,
            tag: None,
            pending: None,
            recorded: false,
        }
    }

    /// Appends `ops` as one record, synced when `sync`. An error leaves the log not live.
    pub fn append(&mut self, ops: &[Op<'_>], sync: bool) -> Result<Appended> {
        let Some(tag) = self.tag else {
            return Ok(Appended::No);
        };
        let need = self.end + record_len(ops);
        let dir = self.path.parent().unwrap_or(Path::new("."));
        if need > MAX_CAPACITY || space_is_low(dir) {
            return Ok(Appended::No);
        }
        let record = encode(ops, tag, self.seq);
        let written = self.ensure_room(need).and_then(|opened| {
            if !opened {
                return Ok(false);
            }
            let file = self.file.as_ref().expect("opened");
            file.write(self.end, &record)?;
            if sync {
                file.sync()?;
            }
            Ok(true)
        });
        match written {
            Ok(true) => {
                self.pending = Some(self.end);
                self.end = need;
                self.seq += 1;
                Ok(Appended::Logged)
            }
            Ok(false) => Ok(Appended::No),
            Err(e) => {
                // The record may have landed whole (a failed sync can still have written it):
                // revoked like one whose redb commit failed.
                self.pending = Some(self.end);
                self.revoke();
                Err(Error::io_at(&self.path, e))
            }
        }
    }

    /// Opens the file and writes zeros ahead until `need` bytes are; false when the file
    /// cannot be opened (the store then commits through redb alone).
    fn ensure_room(&mut self, need: u64) -> std::io::Result<bool> {
        if !self.is_usable() {
            return Ok(false);
        }
        if need <= self.capacity {
            return Ok(true);
        }
        let mut capacity = self.capacity.max(FIRST_CAPACITY);
        while capacity < need {
            capacity *= 2;
        }
        let capacity = capacity.min(MAX_CAPACITY);
        let file = self.file.as_ref().expect("opened");
        let zeros = vec![0u8; 64 << 10];
        let mut at = self.capacity;
        while at < capacity {
            let n = (capacity - at).min(zeros.len() as u64);
            file.write(at, &zeros[..n as usize])?;
            at += n;
        }
        file.sync()?;
        self.capacity = capacity;
        Ok(true)
    }

    /// Opens the log, creating it (and syncing its directory, so the new name survives a power
    /// loss); a file there that is not a log (another store's file named like it) is refused.
    fn open(&self) -> std::io::Result<LogFile> {
        let existed = std::fs::symlink_metadata(&self.path).is_ok();
        let file = match &self.backend {
            Some(make) => LogFile::Backend((make.0)(&self.path)?),
            None => LogFile::Plain(
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&self.path)?,
            ),
        };
        if existed && !file.starts_as_log()? {
            return Err(std::io::Error::other(format!(
                "'{}' is not a write-ahead log of kvstore",
                self.path.display()
            )));
        }
        // Whether or not this process created it: an earlier one may have been killed before
        // its directory was synced.
        sync_dir(&self.path)?;
        Ok(file)
    }

    /// redb committed the batch of the last record.
    pub fn committed(&mut self) {
        self.pending = None;
    }

    /// redb did not commit the batch being written: its record (if it wrote one) must never be
    /// replayed. The log stops being live until the next checkpoint, and the record's header is
    /// zeroed (best effort: a crash before the next checkpoint would otherwise replay it).
    pub fn revoke(&mut self) {
        self.tag = None;
        if let (Some(at), Some(file)) = (self.pending.take(), self.file.as_ref()) {
            if file.write(at, &[0u8; HEADER]).is_ok() {
                let _ = file.sync();
            }
        }
    }

    /// A checkpoint committed `tag` (None: retired the log): new records start at the
    /// beginning under it.
    pub fn restart(&mut self, tag: Option<u64>) {
        self.tag = tag;
        self.recorded = tag.is_some();
        self.end = 0;
        self.seq = 0;
        self.pending = None;
    }

    /// Whether checkpoints keep a log: its file is open (opened now if need be), or false once
    /// it could not be opened.
    pub fn is_usable(&mut self) -> bool {
        if self.file.is_none() && !self.unavailable {
            match self.open().and_then(|file| Ok((file.len()?, file))) {
                Ok((len, file)) => {
                    self.capacity = len;
                    self.file = Some(file);
                }
                Err(_) => self.unavailable = true,
            }
        }
        !self.unavailable
    }

    /// Whether the file may name a tag that the last checkpoint must retire.
    pub fn is_recorded(&self) -> bool {
        self.recorded
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op<'a>(table: &'a str, key: &'a str, value: Option<&'a [u8]>) -> Op<'a> {
        Op {
            table,
            key,
            value: value.map(Cow::Borrowed),
        }
    }

    #[test]
    fn records_round_trip_and_the_first_bad_one_ends_the_log() {
        let a = [op("map:m", "k1", Some(b"v1")), op("map:m", "k2", None)];
        let b = [op("kvstore:meta", "seq:m", Some(&[1, 0, 0, 0, 0, 0, 0, 0]))];
        let mut log = encode(&a, 7, 0);
        log.extend(encode(&b, 7, 1));
        let whole = log.len();
        // A stale record of another tag, then zeros.
        log.extend(encode(&a, 8, 2));
        log.extend([0u8; 100]);
        let found = records(&log, 7);
        assert_eq!(found.len(), 2);
        let ops = decode(found[0], "p").unwrap();
        assert_eq!(ops.len(), 2);
        assert_eq!(
            (ops[0].key, ops[0].value.as_deref()),
            ("k1", Some(&b"v1"[..]))
        );
        assert!(ops[1].value.is_none());
        // Every cut inside the second record leaves only the first.
        let first = encode(&a, 7, 0).len();
        for cut in first..whole {
            assert_eq!(records(&log[..cut], 7).len(), 1, "cut at {cut}");
        }
        // A flipped byte anywhere in the second record ends the log before it.
        for at in first..whole {
            let mut bad = log.clone();
            bad[at] ^= 0x40;
            assert_eq!(records(&bad, 7).len(), 1, "flip at {at}");
        }
        // Out of sequence: a record numbered 1 first is not taken.
        assert!(records(&encode(&a, 7, 1), 7).is_empty());
        assert!(records(&log, 9).is_empty());
    }
}
