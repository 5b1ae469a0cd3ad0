//! The changes of non-durable transactions that are acknowledged but not yet durable. redb keeps
//! them only in the live instance: when a failed write forces the file to be reopened, they would
//! be gone without a crash. The store writes them again, durably, right after the reopen.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use redb::Durability;

use crate::error::{from_redb, Result};
use crate::file::wal::{self, Op};

/// Bytes per transaction of a chunked [`UnsyncedChanges::rewrite`].
const REWRITE_CHUNK: usize = 64 << 10;

/// The last acknowledged record of each key of one table (`None`: deleted).
type Records = HashMap<Box<str>, Option<Arc<[u8]>>>;

/// Every key written since the last durable transaction, by redb table name.
#[derive(Default)]
pub(crate) struct UnsyncedChanges {
    tables: HashMap<String, Records>,
    /// Non-durable transactions recorded since the last durable one.
    transactions: u64,
    /// Every one of them is in the write-ahead log.
    all_logged: bool,
    /// The last of them was synced in the log (which syncs every record before it).
    synced: bool,
}

impl UnsyncedChanges {
    pub fn is_empty(&self) -> bool {
        self.transactions == 0
    }

    /// Records one acknowledged non-durable transaction: `logged`, its record is in the
    /// write-ahead log; `synced`, that record was synced.
    pub fn record<'a>(
        &mut self,
        logged: bool,
        synced: bool,
        changes: impl IntoIterator<Item = (&'a str, &'a str, Option<Arc<[u8]>>)>,
    ) {
        self.all_logged = (self.transactions == 0 || self.all_logged) && logged;
        self.synced = synced;
        for (table, key, record) in changes {
            let keys = match self.tables.get_mut(table) {
                Some(keys) => keys,
                None => self.tables.entry(table.to_string()).or_default(),
            };
            keys.insert(key.into(), record);
        }
        self.transactions += 1;
    }

    /// A durable transaction made everything before it durable.
    pub fn clear(&mut self) {
        self.tables.clear();
        self.transactions = 0;
    }

    /// Whether the write-ahead log holds every kept change, synced: a crash midway through a
    /// rewrite then replays the log, which makes each transaction whole again.
    fn in_synced_log(&self) -> bool {
        self.transactions > 0 && self.all_logged && self.synced
    }

    /// Writes every kept change again, durably (after a reopen): in one transaction, or, when
    /// the log holds them all, synced, in transactions of about [`REWRITE_CHUNK`] bytes, each
    /// reusing the pages the one before it freed — on a full disk one large transaction would
    /// find no room. (Split otherwise, a crash midway could leave a group commit half there.)
    pub fn rewrite(&self, db: &redb::Database, path: &str) -> Result<()> {
        let split = self.in_synced_log();
        let mut chunk = Vec::new();
        let mut bytes = 0usize;
        for (table, keys) in &self.tables {
            for (key, record) in keys {
                bytes += key.len() + record.as_ref().map_or(0, |r| r.len());
                chunk.push(Op {
                    table,
                    key,
                    value: record.as_deref().map(Cow::Borrowed),
                });
                if split && bytes >= REWRITE_CHUNK {
                    write_durably(db, &chunk, path)?;
                    chunk.clear();
                    bytes = 0;
                }
            }
        }
        if chunk.is_empty() {
            return Ok(());
        }
        write_durably(db, &chunk, path)
    }
}

/// `ops` in one durable transaction.
fn write_durably(db: &redb::Database, ops: &[Op<'_>], path: &str) -> Result<()> {
    let err = |e: redb::Error| from_redb(path, e);
    let mut txn = db.begin_write().map_err(|e| err(e.into()))?;
    txn.set_durability(Durability::Immediate)
        .map_err(|e| err(e.into()))?;
    wal::apply(&txn, ops, path)?;
    txn.commit().map_err(|e| err(e.into()))
}
