//! Typed values for Rust callers: serde types stored as standard MessagePack (with field names,
//! so a struct is a map), which is what the Node package's default `msgpack` codec reads and
//! writes. A table used this way should be opened with `codec: "msgpack"`.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::envelope::{self, Record};
use crate::error::{Error, Result};
use crate::store::{EntryGuard, MapStore};

/// The codec name the Node package records for MessagePack tables.
pub const MSGPACK: &str = "msgpack";

pub fn to_msgpack<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>> {
    rmp_serde::to_vec_named(value).map_err(|e| Error::codec(format!("cannot encode value: {e}")))
}

pub fn from_msgpack<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    rmp_serde::from_slice(bytes).map_err(|e| Error::codec(format!("cannot decode value: {e}")))
}

/// A decoded entry: the value and its string metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry<T> {
    pub value: T,
    pub metadata: Vec<(String, String)>,
}

fn decode_entry<T: DeserializeOwned>(key: &str, record: Record) -> Result<Entry<T>> {
    let value = from_msgpack(&record.value)
        .map_err(|e| Error::codec(format!("the value of '{key}': {e}")))?;
    Ok(Entry {
        value,
        metadata: record.metadata,
    })
}

impl MapStore {
    /// The committed entry of `key`, decoded as `T`.
    pub fn get_value<T: DeserializeOwned>(&self, key: &str) -> Result<Option<Entry<T>>> {
        self.get_record(key)?
            .map(|record| decode_entry(key, record))
            .transpose()
    }
}

impl EntryGuard {
    /// The entry as it was when the lock was granted, decoded as `T`.
    pub fn value<T: DeserializeOwned>(&self) -> Result<Option<Entry<T>>> {
        let key = self.key().to_string();
        self.decoded()?
            .map(|record| decode_entry(&key, record))
            .transpose()
    }

    /// Writes `value` with `metadata` and releases the lock.
    pub fn commit_value<T: Serialize + ?Sized>(
        self,
        value: &T,
        metadata: &[(String, String)],
    ) -> Result<()> {
        let bytes = to_msgpack(value)?;
        self.commit(envelope::encode(metadata, &bytes))
    }
}
