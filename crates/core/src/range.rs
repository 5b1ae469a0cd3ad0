//! Walking a table over one consistent snapshot, in byte-wise key order.

use std::ops::Bound;
use std::panic::{catch_unwind, AssertUnwindSafe};
#[cfg(feature = "etcd")]
use std::sync::Arc;

use redb::{OwnedAccessGuard, OwnedRange};

use crate::error::{Error, Result};

/// Which part of a table to walk. `start` is inclusive, `stop` exclusive; `prefix` keeps only
/// keys that begin with it.
#[derive(Debug, Clone, Default)]
pub struct RangeOptions {
    pub prefix: Option<String>,
    pub start: Option<String>,
    pub stop: Option<String>,
    pub reverse: bool,
    pub limit: Option<u64>,
}

/// One stored entry: borrowed from the file's snapshot without a copy, or shared with a
/// cluster replica's. A file key was checked to be UTF-8 when the walk yielded it (a damaged key
/// ends the walk with `DatabaseCorrupt`).
pub struct RawEntry(Raw);

enum Raw {
    File {
        key: OwnedAccessGuard<&'static str>,
        record: OwnedAccessGuard<&'static [u8]>,
    },
    #[cfg(feature = "etcd")]
    Replica { key: String, record: Arc<[u8]> },
}

impl RawEntry {
    pub fn key(&self) -> &str {
        match &self.0 {
            Raw::File { key, .. } => key.value(),
            #[cfg(feature = "etcd")]
            Raw::Replica { key, .. } => key,
        }
    }

    /// The record envelope (see [`crate::envelope`]).
    pub fn record(&self) -> &[u8] {
        match &self.0 {
            Raw::File { record, .. } => record.value(),
            #[cfg(feature = "etcd")]
            Raw::Replica { record, .. } => record,
        }
    }
}

/// What a walk steps through: a range of a file's snapshot, or of a replica's.
enum Walk {
    File(Box<OwnedRange<&'static str, &'static [u8]>>),
    #[cfg(feature = "etcd")]
    Replica(ReplicaWalk),
}

/// A walk over a cluster replica's snapshot (a persistent map, so taking it cost nothing): the
/// bounds close in behind each step.
#[cfg(feature = "etcd")]
struct ReplicaWalk {
    map: crate::etcd::Snapshot,
    lower: Bound<String>,
    upper: Bound<String>,
}

#[cfg(feature = "etcd")]
impl ReplicaWalk {
    fn step(&mut self, reverse: bool) -> Option<(String, Arc<[u8]>)> {
        let mut range = self.map.range((self.lower.clone(), self.upper.clone()));
        let (key, record) = if reverse {
            range.next_back()?
        } else {
            range.next()?
        };
        let (key, record) = (key.clone(), record.clone());
        if reverse {
            self.upper = Bound::Excluded(key.clone());
        } else {
            self.lower = Bound::Excluded(key.clone());
        }
        Some((key, record))
    }
}

/// What a walk needs from the store handle it was taken through.
pub(crate) trait WalkSource: Send + Sync {
    /// The handle is closed: the walk ends with `StoreClosed` at its next step.
    fn closed(&self) -> bool;
    /// A step failed with `err`: tell the store (it reopens the file after an I/O error) and
    /// return the error to report.
    fn failed(&self, err: Error) -> Error;
}

/// A live walk; holds its snapshot until dropped.
pub struct EntryRange {
    inner: Option<Walk>,
    prefix: Option<String>,
    reverse: bool,
    remaining: Option<u64>,
    path: String,
    source: std::sync::Arc<dyn WalkSource>,
}

/// The key bounds a walk covers, after folding the prefix into start and stop.
pub(crate) struct KeyBounds {
    pub lower: Bound<String>,
    pub upper: Bound<String>,
    pub empty: bool,
}

impl RangeOptions {
    pub(crate) fn bounds(&self) -> Result<KeyBounds> {
        let mut lower = match &self.start {
            Some(start) => Bound::Included(start.clone()),
            None => Bound::Unbounded,
        };
        let mut upper = match &self.stop {
            Some(stop) => Bound::Excluded(stop.clone()),
            None => Bound::Unbounded,
        };
        if let Some(prefix) = self.prefix.as_deref().filter(|p| !p.is_empty()) {
            match &self.start {
                Some(start) if !start.starts_with(prefix) => {
                    return Err(Error::invalid(format!(
                        "start '{start}' is outside prefix '{prefix}'"
                    )))
                }
                Some(_) => {}
                None => lower = Bound::Included(prefix.to_string()),
            }
            if let Some(after) = prefix_successor(prefix) {
                let tighter = match &upper {
                    Bound::Excluded(stop) => after < *stop,
                    _ => true,
                };
                if tighter {
                    upper = Bound::Excluded(after);
                }
            }
        }
        let empty = match (&lower, &upper) {
            (Bound::Included(lo), Bound::Excluded(hi)) => lo >= hi,
            _ => false,
        };
        Ok(KeyBounds {
            lower,
            upper,
            empty,
        })
    }
}

/// The least string greater than every string that starts with `prefix`, if there is one.
/// UTF-8 preserves code point order, so bumping the last character is enough.
fn prefix_successor(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        let mut code = last as u32 + 1;
        if (0xD800..0xE000).contains(&code) {
            code = 0xE000;
        }
        if let Some(next) = char::from_u32(code) {
            chars.push(next);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

impl EntryRange {
    pub(crate) fn new(
        table: Option<redb::ReadOnlyTable<&'static str, &'static [u8]>>,
        options: &RangeOptions,
        path: &str,
        source: std::sync::Arc<dyn WalkSource>,
    ) -> Result<Self> {
        let bounds = options.bounds()?;
        let inner = match table {
            Some(table) if !bounds.empty && options.limit != Some(0) => {
                let lower = bound_ref(&bounds.lower);
                let upper = bound_ref(&bounds.upper);
                Some(Walk::File(Box::new(
                    table
                        .range_owned::<&str>((lower, upper))
                        .map_err(|e| crate::error::from_storage(path, e))?,
                )))
            }
            _ => None,
        };
        Ok(EntryRange {
            inner,
            prefix: options.prefix.clone().filter(|p| !p.is_empty()),
            reverse: options.reverse,
            remaining: options.limit,
            path: path.to_string(),
            source,
        })
    }

    /// A walk over a cluster replica's snapshot of one map.
    #[cfg(feature = "etcd")]
    pub(crate) fn replica(
        map: crate::etcd::Snapshot,
        options: &RangeOptions,
        location: &str,
        source: std::sync::Arc<dyn WalkSource>,
    ) -> Result<Self> {
        let bounds = options.bounds()?;
        let inner = (!bounds.empty && options.limit != Some(0)).then(|| {
            Walk::Replica(ReplicaWalk {
                map,
                lower: bounds.lower,
                upper: bounds.upper,
            })
        });
        Ok(EntryRange {
            inner,
            prefix: options.prefix.clone().filter(|p| !p.is_empty()),
            reverse: options.reverse,
            remaining: options.limit,
            path: location.to_string(),
            source,
        })
    }

    fn finish(&mut self) {
        self.inner = None;
    }

    /// Ends the walk at a failed step.
    fn fail(&mut self, err: Error) -> Error {
        self.finish();
        self.source.failed(err)
    }
}

fn bound_ref(bound: &Bound<String>) -> Bound<&str> {
    match bound {
        Bound::Included(s) => Bound::Included(s.as_str()),
        Bound::Excluded(s) => Bound::Excluded(s.as_str()),
        Bound::Unbounded => Bound::Unbounded,
    }
}

impl Iterator for EntryRange {
    type Item = Result<RawEntry>;

    #[cfg_attr(not(feature = "etcd"), allow(clippy::infallible_destructuring_match))]
    fn next(&mut self) -> Option<Self::Item> {
        if self.remaining == Some(0) {
            self.finish();
        }
        let inner = self.inner.as_mut()?;
        if self.source.closed() {
            // Not a failure of the file: the store is not told.
            self.finish();
            return Some(Err(Error::StoreClosed));
        }
        let reverse = self.reverse;
        let inner = match inner {
            Walk::File(inner) => inner,
            #[cfg(feature = "etcd")]
            Walk::Replica(walk) => {
                let Some((key, record)) = walk.step(reverse) else {
                    self.finish();
                    return None;
                };
                if let Some(n) = self.remaining.as_mut() {
                    *n -= 1;
                }
                return Some(Ok(RawEntry(Raw::Replica { key, record })));
            }
        };
        let step = crate::error::guard_damage(&self.path, || {
            Ok(if reverse {
                inner.next_back()
            } else {
                inner.next()
            })
        });
        let item = match step {
            Ok(item) => item,
            Err(damaged) => return Some(Err(self.fail(damaged))),
        };
        match item {
            None => {
                self.finish();
                None
            }
            Some(Err(e)) => {
                let err = crate::error::from_storage(&self.path, e);
                Some(Err(self.fail(err)))
            }
            Some(Ok((key, record))) => {
                // redb decodes a `&str` key with a panic when it is not UTF-8 (a damaged
                // file): decode it once here, where that becomes a typed error, so the
                // caller's `key()` never panics. The file itself reads fine: no reopen.
                let prefix = self.prefix.as_deref();
                let in_prefix = catch_unwind(AssertUnwindSafe(|| {
                    let key = key.value();
                    match prefix {
                        Some(prefix) => key.starts_with(prefix),
                        None => true,
                    }
                }));
                let Ok(in_prefix) = in_prefix else {
                    self.finish();
                    return Some(Err(Error::DatabaseCorrupt {
                        path: self.path.clone(),
                        detail: "a stored key is not valid UTF-8".into(),
                    }));
                };
                if !in_prefix {
                    self.finish();
                    return None;
                }
                if let Some(n) = self.remaining.as_mut() {
                    *n -= 1;
                }
                Some(Ok(RawEntry(Raw::File { key, record })))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn successor_bounds_every_key_with_the_prefix() {
        assert_eq!(prefix_successor("/foo").as_deref(), Some("/fop"));
        assert_eq!(prefix_successor("a\u{10FFFF}").as_deref(), Some("b"));
        assert_eq!(prefix_successor("\u{10FFFF}"), None);
        assert_eq!(prefix_successor("a\u{D7FF}").as_deref(), Some("a\u{E000}"));
        let succ = prefix_successor("ab").unwrap();
        for key in ["ab", "ab\u{0}", "abz", "ab\u{10FFFF}\u{10FFFF}"] {
            assert!(key < succ.as_str());
        }
    }

    #[test]
    fn start_outside_prefix_is_invalid() {
        let opts = RangeOptions {
            prefix: Some("/foo".into()),
            start: Some("/bar".into()),
            ..Default::default()
        };
        assert_eq!(
            opts.bounds().err().unwrap().code(),
            crate::ErrorCode::InvalidArgument
        );
    }
}
