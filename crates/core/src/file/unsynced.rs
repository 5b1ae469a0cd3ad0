//! The changes of non-durable transactions that are acknowledged but not yet durable. redb keeps
//! them only in the live instance: when a failed write forces the file to be reopened, they would
//! be gone without a crash. The store writes them again, durably, right after the reopen.

use std::collections::HashMap;
use std::sync::Arc;

use redb::{Durability, TableDefinition};

use crate::error::{from_redb, Result};

/// The last acknowledged record of each key of one table (`None`: deleted).
type Records = HashMap<Box<str>, Option<Arc<[u8]>>>;

/// Every key written since the last durable transaction, by redb table name.
#[derive(Default)]
pub(crate) struct UnsyncedChanges {
    tables: HashMap<String, Records>,
    /// Non-durable transactions recorded since the last durable one.
    transactions: u64,
}

impl UnsyncedChanges {
    pub fn is_empty(&self) -> bool {
        self.transactions == 0
    }

    /// Records one acknowledged non-durable transaction.
    pub fn record<'a>(
        &mut self,
        changes: impl IntoIterator<Item = (&'a str, &'a str, Option<Arc<[u8]>>)>,
    ) {
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

    /// Writes every kept change in one durable transaction (after a reopen).
    pub fn rewrite(&self, db: &redb::Database, path: &str) -> Result<()> {
        let err = |e: redb::Error| from_redb(path, e);
        let mut txn = db.begin_write().map_err(|e| err(e.into()))?;
        txn.set_durability(Durability::Immediate)
            .map_err(|e| err(e.into()))?;
        for (name, keys) in &self.tables {
            let mut table = txn
                .open_table(TableDefinition::<&str, &[u8]>::new(name))
                .map_err(|e| err(e.into()))?;
            for (key, record) in keys {
                match record {
                    Some(record) => table.insert(&**key, &**record).map(drop),
                    None => table.remove(&**key).map(drop),
                }
                .map_err(|e| err(e.into()))?;
            }
        }
        txn.commit().map_err(|e| err(e.into()))
    }
}
