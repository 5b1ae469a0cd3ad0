//! The entry cache: committed record bytes by key, least recently used out first. Only the
//! writer changes it after a commit, and a reader may fill it only if no commit happened since
//! the reader's snapshot began (the generation check), so it never holds stale data.
//!
//! It also keeps one read snapshot `S` for misses, valid for the generation it was opened in:
//! opening a read transaction per lookup costs more than the lookup.

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use lru::LruCache;

/// Committed record bytes; `None` caches "no such entry".
pub type Cached = Option<Arc<[u8]>>;

struct CacheState<S> {
    entries: Option<LruCache<Box<str>, Cached>>,
    generation: u64,
    snapshot: Option<(u64, S)>,
    hits: u64,
    misses: u64,
}

pub struct EntryCache<S = ()> {
    state: Mutex<CacheState<S>>,
}

/// What a lookup found: a cached answer, or the generation to quote when filling it in and
/// the snapshot to read from, if one of this generation is kept.
pub enum Lookup<S> {
    Hit(Cached),
    Miss {
        generation: u64,
        snapshot: Option<S>,
    },
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheCounts {
    pub hits: u64,
    pub misses: u64,
    pub entries: u64,
}

impl<S: Clone> EntryCache<S> {
    pub fn new(capacity: usize) -> Self {
        EntryCache {
            state: Mutex::new(CacheState {
                entries: NonZeroUsize::new(capacity).map(LruCache::new),
                generation: 0,
                snapshot: None,
                hits: 0,
                misses: 0,
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, CacheState<S>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn lookup(&self, key: &str) -> Lookup<S> {
        let mut state = self.state();
        let found = state.entries.as_mut().and_then(|e| e.get(key).cloned());
        match found {
            Some(cached) => {
                state.hits += 1;
                Lookup::Hit(cached)
            }
            None => {
                state.misses += 1;
                let generation = state.generation;
                let snapshot = match &state.snapshot {
                    Some((g, s)) if *g == generation => Some(s.clone()),
                    _ => None,
                };
                Lookup::Miss {
                    generation,
                    snapshot,
                }
            }
        }
    }

    /// Fills in what a reader found, unless a commit happened since `generation`.
    pub fn fill(&self, key: &str, generation: u64, value: Cached) {
        let mut state = self.state();
        if state.generation != generation {
            return;
        }
        if let Some(entries) = state.entries.as_mut() {
            entries.put(key.into(), value);
        }
    }

    /// Keeps a snapshot opened after `generation` was read, unless a commit came since.
    pub fn keep_snapshot(&self, generation: u64, snapshot: S) {
        let mut state = self.state();
        if state.generation == generation {
            state.snapshot = Some((generation, snapshot));
        }
    }

    /// Forgets every entry: after a failed write whose outcome is unknown (a failed fsync may
    /// still have landed), only the file can say what is committed.
    pub fn clear(&self) {
        let mut state = self.state();
        state.generation += 1;
        let stale = state.snapshot.take();
        if let Some(entries) = state.entries.as_mut() {
            entries.clear();
        }
        drop(state);
        drop(stale);
    }

    /// Lets go of the kept snapshot. The writer does this after every transaction, whatever
    /// tables it wrote: a live read transaction stops redb from reusing the pages freed since,
    /// so a snapshot kept by a rarely written table would grow the file without bound.
    pub fn forget_snapshot(&self) {
        let stale = self.state().snapshot.take();
        drop(stale);
    }

    /// Lets go of the kept snapshot and refuses any snapshot opened before now (compaction and
    /// close need every read transaction gone, including one a reader is about to keep).
    pub fn refuse_snapshots(&self) {
        let mut state = self.state();
        state.generation += 1;
        let stale = state.snapshot.take();
        drop(state);
        drop(stale);
    }

    /// Applies one committed batch. Called by the writer after the transaction is durable and
    /// before any lock of the batch is released.
    pub fn apply<'a>(&self, changes: impl IntoIterator<Item = (&'a str, Cached)>) {
        let mut state = self.state();
        state.generation += 1;
        let stale = state.snapshot.take();
        if let Some(entries) = state.entries.as_mut() {
            for (key, value) in changes {
                entries.put(key.into(), value);
            }
        }
        drop(state);
        drop(stale);
    }

    pub fn counts(&self) -> CacheCounts {
        let state = self.state();
        CacheCounts {
            hits: state.hits,
            misses: state.misses,
            entries: state.entries.as_ref().map_or(0, |e| e.len() as u64),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(s: &str) -> Cached {
        Some(Arc::from(s.as_bytes()))
    }

    #[test]
    fn a_snapshot_is_offered_only_in_its_generation() {
        let cache: EntryCache<&str> = EntryCache::new(0);
        let Lookup::Miss {
            generation,
            snapshot: None,
        } = cache.lookup("k")
        else {
            panic!("nothing kept yet")
        };
        cache.keep_snapshot(generation, "snap");
        assert!(matches!(
            cache.lookup("k"),
            Lookup::Miss {
                snapshot: Some("snap"),
                ..
            }
        ));
        cache.apply([("other", bytes("v"))]);
        assert!(matches!(
            cache.lookup("k"),
            Lookup::Miss { snapshot: None, .. }
        ));
        cache.keep_snapshot(generation, "late");
        assert!(matches!(
            cache.lookup("k"),
            Lookup::Miss { snapshot: None, .. }
        ));
    }

    #[test]
    fn is_bounded_and_evicts_least_recently_used() {
        let cache: EntryCache = EntryCache::new(2);
        cache.apply([("a", bytes("1")), ("b", bytes("2"))]);
        assert!(matches!(cache.lookup("a"), Lookup::Hit(_)));
        cache.apply([("c", bytes("3"))]);
        assert!(matches!(cache.lookup("b"), Lookup::Miss { .. }));
        assert!(matches!(cache.lookup("a"), Lookup::Hit(_)));
        assert_eq!(cache.counts().entries, 2);
        assert_eq!(cache.counts().hits, 2);
        assert_eq!(cache.counts().misses, 1);
    }

    #[test]
    fn a_fill_that_raced_a_commit_is_dropped() {
        let cache: EntryCache = EntryCache::new(10);
        let Lookup::Miss { generation, .. } = cache.lookup("k") else {
            panic!("empty cache hit")
        };
        cache.apply([("k", bytes("new"))]);
        cache.fill("k", generation, bytes("old"));
        match cache.lookup("k") {
            Lookup::Hit(Some(v)) => assert_eq!(&*v, b"new"),
            _ => panic!("expected the committed value"),
        }
    }

    #[test]
    fn capacity_zero_disables() {
        let cache: EntryCache = EntryCache::new(0);
        cache.apply([("k", bytes("v"))]);
        assert!(matches!(cache.lookup("k"), Lookup::Miss { .. }));
        assert_eq!(cache.counts().entries, 0);
    }
}
