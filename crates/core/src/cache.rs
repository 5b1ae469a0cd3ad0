//! The entry cache: committed record bytes by key, least recently used out first. Only the
//! writer changes it after a commit, and a reader may fill it only if no commit began since
//! the reader's lookup (the generation check) and none is in flight, so it never holds stale
//! data.
//!
//! It also keeps one read snapshot `S` for misses, valid for the generation it was opened in:
//! opening a read transaction per lookup costs more than the lookup.
//!
//! Its size is a budget in bytes (keys, records and a fixed cost per entry), with an optional
//! cap on entries: a count alone would let a few thousand large records take gigabytes.

use std::sync::{Arc, Mutex};

use lru::LruCache;

/// Committed record bytes; `None` caches "no such entry".
pub type Cached = Option<Arc<[u8]>>;

/// What an entry is counted at besides its key and record bytes: the LRU node, the hash slot
/// and the two allocations' headers (measured: ~110 bytes on x86-64).
pub const ENTRY_OVERHEAD: usize = 128;

/// The bytes an entry is counted at against the budget.
fn cost(key: &str, value: &Cached) -> usize {
    ENTRY_OVERHEAD + key.len() + value.as_ref().map_or(0, |v| v.len())
}

struct CacheState<S> {
    entries: Option<LruCache<Box<str>, Cached>>,
    /// What the entries are counted at (see [`cost`]), at most `budget`.
    bytes: usize,
    budget: usize,
    /// The most entries (`usize::MAX`: no cap but the budget).
    capacity: usize,
    /// A transaction is being committed: its changes may already be visible to new read
    /// snapshots while older snapshots still show the values before. Readers neither fill the
    /// cache nor keep a snapshot until the writer has applied the batch (see
    /// [`EntryCache::begin_commit`]).
    committing: bool,
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
    /// What the entries are counted at against the budget.
    pub bytes: u64,
}

impl<S> CacheState<S> {
    /// Caches `value` for `key`, least recently used entries out first while over budget. A
    /// record larger than an eighth of the budget is not kept (it would push out many others),
    /// and neither is an older value of its key.
    fn put(&mut self, key: &str, value: Cached) {
        self.remove(key);
        let added = cost(key, &value);
        let Some(entries) = self.entries.as_mut() else {
            return;
        };
        if added > self.budget / 8 {
            return;
        }
        entries.push(key.into(), value);
        self.bytes += added;
        while self.bytes > self.budget || entries.len() > self.capacity {
            match entries.pop_lru() {
                Some((out_key, out_value)) => self.bytes -= cost(&out_key, &out_value),
                None => break,
            }
        }
    }

    /// Drops `key`'s cached value, if any.
    fn remove(&mut self, key: &str) {
        if let Some(old) = self.entries.as_mut().and_then(|e| e.pop(key)) {
            self.bytes -= cost(key, &old);
        }
    }
}

impl<S: Clone> EntryCache<S> {
    /// A cache of at most `budget` bytes (see [`cost`]) and `capacity` entries; either 0
    /// disables it.
    pub fn new(capacity: usize, budget: usize) -> Self {
        // Unbounded, the cap enforced in `put`: a bounded LruCache reserves its capacity up
        // front (a cap of 10^9 asked for terabytes and aborted the process).
        let entries = (capacity > 0 && budget > 0).then(LruCache::unbounded);
        EntryCache {
            state: Mutex::new(CacheState {
                entries,
                bytes: 0,
                budget,
                capacity,
                committing: false,
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
        if state.generation != generation || state.committing {
            return;
        }
        state.put(key, value);
    }

    /// Keeps a snapshot opened after `generation` was read, unless a commit came since.
    pub fn keep_snapshot(&self, generation: u64, snapshot: S) {
        let mut state = self.state();
        if state.generation == generation && !state.committing {
            state.snapshot = Some((generation, snapshot));
        }
    }

    /// Forgets every entry: after a failed write whose outcome is unknown (a failed fsync may
    /// still have landed), only the file can say what is committed.
    pub fn clear(&self) {
        self.next_generation(|state| {
            if let Some(entries) = state.entries.as_mut() {
                entries.clear();
            }
            state.bytes = 0;
        });
    }

    /// Lets go of the kept snapshot and refuses any snapshot opened before now (compaction and
    /// close need every read transaction gone, including one a reader is about to keep).
    pub fn refuse_snapshots(&self) {
        self.next_generation(|_| {});
    }

    /// Moves to the next generation (no fill or snapshot of an earlier one is taken from then
    /// on), lets go of the kept snapshot and makes `change`, all under the lock. The snapshot is
    /// dropped after the lock is let go, so ending its read transaction holds up no reader.
    fn next_generation(&self, change: impl FnOnce(&mut CacheState<S>)) {
        let mut state = self.state();
        state.generation += 1;
        let stale = state.snapshot.take();
        change(&mut state);
        drop(state);
        drop(stale);
    }

    /// A transaction is about to be committed. From the moment its changes become visible
    /// until [`EntryCache::end_commit`], two read snapshots of one generation could disagree
    /// (one opened before, one after): a reader that kept or cached the older one would hand a
    /// value older than one already read (issue 11's review: "saw 24454 then 24453"). So the
    /// generation moves on now and again at the end, and meanwhile nothing is filled or kept.
    /// The writer also [`EntryCache::forget`]s each key the transaction writes.
    pub fn begin_commit(&self) {
        self.next_generation(|state| state.committing = true);
    }

    /// Drops `key`'s cached value, as a transaction writing it begins: from the moment the
    /// commit is visible until the writer applies it, a reader that missed would read the new
    /// value from the file, and one that hit the old one afterwards would go back in time.
    pub fn forget(&self, key: &str) {
        self.state().remove(key);
    }

    /// The transaction begun with [`EntryCache::begin_commit`] is committed or failed.
    pub fn end_commit(&self) {
        self.next_generation(|state| state.committing = false);
    }

    /// Applies one committed batch. Called by the writer after the transaction is durable and
    /// before any lock of the batch is released.
    pub fn apply<'a>(&self, changes: impl IntoIterator<Item = (&'a str, Cached)>) {
        self.next_generation(|state| {
            for (key, value) in changes {
                state.put(key, value);
            }
        });
    }

    pub fn counts(&self) -> CacheCounts {
        let state = self.state();
        CacheCounts {
            hits: state.hits,
            misses: state.misses,
            entries: state.entries.as_ref().map_or(0, |e| e.len() as u64),
            bytes: state.bytes as u64,
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
        let cache: EntryCache<&str> = EntryCache::new(0, 0);
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
        let cache: EntryCache = EntryCache::new(2, 1 << 20);
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
        let cache: EntryCache = EntryCache::new(10, 1 << 20);
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
        for (capacity, budget) in [(0, 1 << 20), (10, 0)] {
            let cache: EntryCache = EntryCache::new(capacity, budget);
            cache.apply([("k", bytes("v"))]);
            assert!(matches!(cache.lookup("k"), Lookup::Miss { .. }));
            assert_eq!(cache.counts().entries, 0);
        }
    }

    fn record(len: usize) -> Cached {
        Some(Arc::from(vec![7u8; len]))
    }

    #[test]
    fn holds_records_within_its_budget_in_bytes_least_recently_used_out_first() {
        // Room for ten entries of 1000-byte records under one-letter keys, and 10 bytes more.
        let one = cost("a", &record(1000));
        let cache: EntryCache = EntryCache::new(usize::MAX, 10 * one + 10);
        for key in ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"] {
            cache.apply([(key, record(1000))]);
        }
        assert_eq!(cache.counts().entries, 10);
        assert_eq!(cache.counts().bytes as usize, 10 * one);
        assert!(
            matches!(cache.lookup("a"), Lookup::Hit(_)),
            "a is now the most recent"
        );
        cache.apply([("k", record(1000))]);
        assert_eq!(cache.counts().entries, 10);
        assert!(
            matches!(cache.lookup("b"), Lookup::Miss { .. }),
            "b went first"
        );
        assert!(matches!(cache.lookup("a"), Lookup::Hit(_)));
        // A larger record pushes out as many as it takes: c and d.
        let large = record(1400 - ENTRY_OVERHEAD - 1);
        assert_eq!(cost("l", &large), 1400);
        cache.apply([("l", large)]);
        assert_eq!(cache.counts().entries, 9);
        assert_eq!(cache.counts().bytes as usize, 8 * one + 1400);
        assert!(matches!(cache.lookup("c"), Lookup::Miss { .. }));
        assert!(matches!(cache.lookup("d"), Lookup::Miss { .. }));
        assert!(matches!(cache.lookup("e"), Lookup::Hit(_)));
        // A record replaced by a smaller one is counted at its new size.
        cache.apply([("l", record(1))]);
        assert_eq!(cache.counts().entries, 9);
        assert_eq!(
            cache.counts().bytes as usize,
            8 * one + cost("l", &record(1))
        );
    }

    #[test]
    fn a_record_too_large_to_keep_also_drops_the_older_value_of_its_key() {
        let cache: EntryCache = EntryCache::new(usize::MAX, 8 * 1024);
        cache.apply([("k", record(10)), ("other", record(10))]);
        cache.apply([("k", record(2 * 1024))]);
        // Not kept (over an eighth of the budget), and the old value is gone: no stale hit.
        assert!(matches!(cache.lookup("k"), Lookup::Miss { .. }));
        assert!(matches!(cache.lookup("other"), Lookup::Hit(_)));
        assert_eq!(cache.counts().entries, 1);
        assert_eq!(cache.counts().bytes as usize, cost("other", &record(10)));
        let Lookup::Miss { generation, .. } = cache.lookup("k") else {
            panic!("not kept")
        };
        cache.fill("k", generation, record(4 * 1024));
        assert!(matches!(cache.lookup("k"), Lookup::Miss { .. }));
    }

    #[test]
    fn a_commit_in_flight_refuses_fills_and_kept_snapshots_from_before_and_during_it() {
        let cache: EntryCache<&str> = EntryCache::new(usize::MAX, 1 << 20);
        let Lookup::Miss {
            generation: before, ..
        } = cache.lookup("k")
        else {
            panic!("empty cache hit")
        };
        cache.begin_commit();
        // A reader that looked before the commit began, and one that looks during it.
        cache.fill("k", before, bytes("old"));
        cache.keep_snapshot(before, "old snapshot");
        let Lookup::Miss {
            generation: during,
            snapshot: None,
        } = cache.lookup("k")
        else {
            panic!("nothing kept")
        };
        cache.fill("k", during, bytes("either"));
        cache.keep_snapshot(during, "either snapshot");
        assert!(matches!(
            cache.lookup("k"),
            Lookup::Miss { snapshot: None, .. }
        ));
        cache.end_commit();
        cache.fill("k", during, bytes("either"));
        assert!(matches!(
            cache.lookup("k"),
            Lookup::Miss { snapshot: None, .. }
        ));
        // After the commit, readers fill and keep again.
        let Lookup::Miss {
            generation: after, ..
        } = cache.lookup("k")
        else {
            panic!("not filled")
        };
        cache.keep_snapshot(after, "new snapshot");
        cache.fill("k", after, bytes("new"));
        assert!(matches!(cache.lookup("k"), Lookup::Hit(Some(_))));
    }

    #[test]
    fn the_keys_a_commit_writes_leave_the_cache_as_it_begins() {
        let cache: EntryCache = EntryCache::new(usize::MAX, 1 << 20);
        cache.apply([("k", bytes("old")), ("other", bytes("o"))]);
        cache.begin_commit();
        cache.forget("k");
        // Between the commit becoming visible and the writer applying it, a reader that read
        // the new value from the file must not then hit the old one here.
        assert!(matches!(cache.lookup("k"), Lookup::Miss { .. }));
        assert!(matches!(cache.lookup("other"), Lookup::Hit(_)));
        assert_eq!(cache.counts().bytes as usize, cost("other", &bytes("o")));
        cache.end_commit();
        cache.apply([("k", bytes("new"))]);
        match cache.lookup("k") {
            Lookup::Hit(Some(v)) => assert_eq!(&*v, b"new"),
            _ => panic!("the applied value"),
        }
    }

    #[test]
    fn a_huge_cap_on_entries_allocates_nothing_up_front() {
        let cache: EntryCache = EntryCache::new(1 << 40, 1 << 20);
        cache.apply([("a", record(1))]);
        assert_eq!(cache.counts().entries, 1);
    }

    #[test]
    fn the_cap_on_entries_still_applies_under_the_budget() {
        let cache: EntryCache = EntryCache::new(2, 1 << 20);
        cache.apply([("a", record(1)), ("b", record(1)), ("c", record(1))]);
        assert_eq!(cache.counts().entries, 2);
        assert_eq!(cache.counts().bytes as usize, 2 * cost("a", &record(1)));
    }
}
