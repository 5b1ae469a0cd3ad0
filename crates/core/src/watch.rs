//! Watches of committed changes: the hub a storage publishes each transaction's changes to, and
//! the [`Watcher`] a caller reads them from.
//!
//! A hub belongs to one storage core (a file's writer, a cluster's replica) and so hears every
//! commit of the process (file) or of every process (cluster), in commit order. Per map it keeps
//! the list of watchers; each watcher has a bounded queue of the changes it has not read yet,
//! and a wake callback that a reader parks while its queue is empty.
//!
//! - **Nil cost unwatched.** [`WatchHub::publish`] begins with one atomic load of the number of
//!   watchers of the whole hub and returns when it is zero, before looking at the changes (an
//!   iterator it never consumes then).
//! - **A transaction is one run.** The publisher hands over all changes of one transaction at
//!   once; the hub puts them into every watcher's queue under the hub's lock, so no other
//!   transaction's change can come between them, and a reader woken meanwhile waits for the
//!   whole run (it cannot take from a queue the hub is filling).
//! - **Bounded.** A watcher whose queue would hold more than its `high_water_mark` changes is
//!   failed with [`Error::WatchOverflow`]: its queue is dropped at once (the memory goes), and
//!   its reader hears the error next, then the end.
//! - **Ended** by [`Watcher::close`] (or dropping it), by closing the handle it was opened
//!   through ([`WatchHub::close_owner`]), or for all watchers at once with an error
//!   ([`WatchHub::fail_all`]: a cluster replica that had to re-read its prefix and cannot
//!   replay what it missed). Ending a watcher takes it out of the hub and frees its queue.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::envelope::{self, Record};
use crate::error::{Error, Result};
use crate::locks::OwnerId;

/// What a watch hears, given when it is opened (see [`crate::MapStore::watch`]).
#[derive(Debug, Clone)]
pub struct WatchOptions {
    /// Only keys that begin with this.
    pub prefix: Option<String>,
    /// Most changes the watcher holds unread; one more fails it with
    /// [`Error::WatchOverflow`]. At least 1.
    pub high_water_mark: usize,
}

impl Default for WatchOptions {
    fn default() -> Self {
        WatchOptions {
            prefix: None,
            high_water_mark: 10_000,
        }
    }
}

/// One committed change of a watched map: the key and its new record (an envelope), or `None`
/// when the entry was deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchEvent {
    pub key: Arc<str>,
    pub record: Option<Arc<[u8]>>,
}

impl WatchEvent {
    pub fn is_delete(&self) -> bool {
        self.record.is_none()
    }

    /// The record decoded from its envelope (`None` for a deletion).
    pub fn decoded(&self) -> Result<Option<Record>> {
        self.record.as_deref().map(envelope::decode).transpose()
    }
}

/// What [`Watcher::poll`] and its kin found.
#[derive(Debug)]
pub enum WatchNext {
    /// Changes in commit order (at least one).
    Changes(Vec<WatchEvent>),
    /// Nothing yet (a wake callback was parked, if one was offered).
    Pending,
    /// The watch failed (an overflow, a gap it cannot replay); it is ended from now on.
    Failed(Error),
    /// The watch was closed: nothing more comes.
    Ended,
}

/// Called once when a parked reader has something to read: changes, a failure or the end. It
/// runs on the publishing thread (a file's writer, a cluster's runtime) and must not block.
pub type WatchWaker = Box<dyn FnOnce() + Send>;

enum End {
    Failed(Error),
    Closed,
}

#[derive(Default)]
struct Queue {
    changes: VecDeque<WatchEvent>,
    end: Option<End>,
    waker: Option<WatchWaker>,
}

/// One watcher as the hub holds it.
struct Slot {
    map: String,
    owner: OwnerId,
    prefix: String,
    capacity: usize,
    /// Changes at positions up to this one happened before the watch began (a cluster's
    /// revision; see [`WatchHub::watch`]).
    after: i64,
    queue: Mutex<Queue>,
}

impl Slot {
    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ends the watcher with `end` (unless it has ended), dropping what it had not read. Returns
    /// the parked reader to wake.
    fn end(&self, end: End) -> Option<WatchWaker> {
        let mut queue = self.queue();
        if queue.end.is_none() {
            queue.end = Some(end);
            queue.changes = VecDeque::new();
        }
        queue.waker.take()
    }
}

/// The part of a published run that goes to one map: (map, its watchers, its changes).
type MapRun<'a> = (&'a str, &'a Vec<Arc<Slot>>, Vec<WatchEvent>);

#[derive(Default)]
pub(crate) struct WatchHub {
    /// Watchers in `maps`, over every map: the one thing a publisher reads when nobody watches.
    watchers: AtomicUsize,
    /// Map name → its watchers.
    maps: Mutex<HashMap<String, Vec<Arc<Slot>>>>,
}

impl WatchHub {
    fn maps(&self) -> MutexGuard<'_, HashMap<String, Vec<Arc<Slot>>>> {
        self.maps.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether anyone watches any map of this hub (one atomic load).
    pub fn is_watched(&self) -> bool {
        self.watchers.load(Ordering::SeqCst) != 0
    }

    /// Starts a watch of `map` for `owner` (the handle it is opened through, which ends it on
    /// close). Changes published at a position up to `after()` are not delivered to it: a
    /// cluster gives the newest revision this process has heard of, so a change it already
    /// acknowledged (its own commit, whose watch event arrives later) is not reported as new.
    /// A file gives [`i64::MIN`]. `after` is asked once the watch counts, so a publisher that
    /// did not see the watch published only changes at positions it would skip anyway.
    pub fn watch(
        self: &Arc<Self>,
        map: &str,
        owner: OwnerId,
        options: &WatchOptions,
        after: impl FnOnce() -> i64,
    ) -> Result<Watcher> {
        if options.high_water_mark == 0 {
            return Err(Error::invalid("highWaterMark must be at least 1"));
        }
        let mut maps = self.maps();
        // Under the lock, so that a publisher that sees the count sees the slot.
        self.watchers.fetch_add(1, Ordering::SeqCst);
        let slot = Arc::new(Slot {
            map: map.to_string(),
            owner,
            prefix: options.prefix.clone().unwrap_or_default(),
            capacity: options.high_water_mark,
            after: after(),
            queue: Mutex::default(),
        });
        maps.entry(map.to_string()).or_default().push(slot.clone());
        drop(maps);
        Ok(Watcher {
            hub: self.clone(),
            slot,
        })
    }

    /// Hands every watcher of each change's map the changes of one transaction, as one run,
    /// with `position` (a cluster's revision; 0 for a file). `changes` are (map, key, record or
    /// `None` for a deletion), in commit order; they are not looked at when nobody watches.
    pub fn publish<'a, I>(&self, position: i64, changes: I)
    where
        I: IntoIterator<Item = (&'a str, &'a str, Option<&'a Arc<[u8]>>)>,
    {
        if !self.is_watched() {
            return;
        }
        let maps = self.maps();
        // Each change once, shared by every watcher's queue, grouped by map (a run seldom
        // spans more than a few): (map, its watchers, its changes).
        let mut run: Vec<MapRun<'_>> = Vec::new();
        for (map, key, record) in changes {
            let Some(slots) = maps.get(map) else {
                continue;
            };
            let event = WatchEvent {
                key: Arc::from(key),
                record: record.cloned(),
            };
            match run.iter_mut().find(|(m, _, _)| *m == map) {
                Some((_, _, events)) => events.push(event),
                None => run.push((map, slots, vec![event])),
            }
        }
        let mut wake = Vec::new();
        for (_, slots, events) in &run {
            for slot in slots.iter() {
                if position <= slot.after {
                    continue;
                }
                let mut queue = slot.queue();
                if queue.end.is_some() {
                    continue;
                }
                let before = queue.changes.len();
                let prefix = slot.prefix.as_str();
                queue
                    .changes
                    .extend(events.iter().filter(|e| e.key.starts_with(prefix)).cloned());
                if queue.changes.len() > slot.capacity {
                    queue.end = Some(End::Failed(overflow(&slot.map, slot.capacity)));
                    queue.changes = VecDeque::new();
                } else if queue.changes.len() == before {
                    continue;
                }
                wake.extend(queue.waker.take());
            }
        }
        drop(maps);
        for waker in wake {
            waker();
        }
    }

    /// Ends every watcher opened through `owner` (its handle closed): each reader hears the end.
    pub fn close_owner(&self, owner: OwnerId) {
        self.remove_where(|slot| slot.owner == owner, || End::Closed);
    }

    /// Ends every watcher with `err` (each reader hears it, then the end).
    #[cfg_attr(not(any(test, feature = "etcd")), allow(dead_code))]
    pub fn fail_all(&self, err: &Error) {
        self.remove_where(|_| true, || End::Failed(err.clone()));
    }

    fn remove_where(&self, which: impl Fn(&Slot) -> bool, end: impl Fn() -> End) {
        if !self.is_watched() {
            return;
        }
        let mut removed = Vec::new();
        let mut maps = self.maps();
        maps.retain(|_, slots| {
            slots.retain(|slot| {
                let gone = which(slot);
                if gone {
                    removed.push(slot.clone());
                }
                !gone
            });
            !slots.is_empty()
        });
        self.watchers.fetch_sub(removed.len(), Ordering::AcqRel);
        drop(maps);
        for slot in removed {
            if let Some(waker) = slot.end(end()) {
                waker();
            }
        }
    }

    /// Takes `slot` out of the hub, if it is still there.
    fn remove(&self, slot: &Arc<Slot>) {
        let mut maps = self.maps();
        let Some(slots) = maps.get_mut(&slot.map) else {
            return;
        };
        let before = slots.len();
        slots.retain(|s| !Arc::ptr_eq(s, slot));
        let removed = before - slots.len();
        if slots.is_empty() {
            maps.remove(&slot.map);
        }
        self.watchers.fetch_sub(removed, Ordering::AcqRel);
    }

    /// How many watchers `map` has.
    pub fn count(&self, map: &str) -> usize {
        if !self.is_watched() {
            return 0;
        }
        self.maps().get(map).map_or(0, Vec::len)
    }
}

fn overflow(map: &str, capacity: usize) -> Error {
    Error::WatchOverflow {
        message: format!(
            "the watch of '{map}' fell more than {capacity} changes behind (its highWaterMark); \
             it ended and its unread changes were dropped: read the map again and watch anew"
        ),
    }
}

/// One watch of one map (see [`crate::MapStore::watch`]). Dropping it ends the watch.
pub struct Watcher {
    hub: Arc<WatchHub>,
    slot: Arc<Slot>,
}

impl Watcher {
    /// Up to `max` changes in commit order, or the failure or the end, when there are; else
    /// parks the callback `make_waker` builds (replacing one parked before), which is called
    /// once there is something to read, and returns [`WatchNext::Pending`].
    pub fn poll(&self, max: usize, make_waker: impl FnOnce() -> WatchWaker) -> WatchNext {
        let mut queue = self.slot.queue();
        match take(&mut queue, max) {
            WatchNext::Pending => {
                queue.waker = Some(make_waker());
                WatchNext::Pending
            }
            other => other,
        }
    }

    /// Calls `waker` once there is something to read (changes, the failure or the end): at
    /// once, on this thread, when there is now; else it is parked as by [`Watcher::poll`].
    pub fn wake_when_ready(&self, waker: WatchWaker) {
        let mut queue = self.slot.queue();
        if queue.changes.is_empty() && queue.end.is_none() {
            queue.waker = Some(waker);
            return;
        }
        drop(queue);
        waker();
    }

    /// As [`Watcher::poll`], parking nothing.
    pub fn try_next(&self, max: usize) -> WatchNext {
        take(&mut self.slot.queue(), max)
    }

    /// Waits up to `timeout` (forever with `None`) for changes, the failure or the end;
    /// [`WatchNext::Pending`] when the time ran out.
    pub fn recv(&self, max: usize, timeout: Option<Duration>) -> WatchNext {
        let (tx, rx) = mpsc::channel();
        let found = self.poll(max, move || {
            Box::new(move || {
                let _ = tx.send(());
            })
        });
        if !matches!(found, WatchNext::Pending) {
            return found;
        }
        let woken = match timeout {
            Some(timeout) => rx.recv_timeout(timeout).is_ok(),
            None => rx.recv().is_ok(),
        };
        let found = self.try_next(max);
        if !woken {
            self.slot.queue().waker = None;
        }
        found
    }

    /// Whether the watch has ended (closed, failed or overflowed), read or not.
    pub fn is_ended(&self) -> bool {
        self.slot.queue().end.is_some()
    }

    /// Ends the watch: it leaves the hub, its unread changes are freed, and a parked reader
    /// hears the end. Idempotent.
    pub fn close(&self) {
        self.hub.remove(&self.slot);
        if let Some(waker) = self.slot.end(End::Closed) {
            waker();
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.close();
    }
}

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watcher")
            .field("map", &self.slot.map)
            .field("prefix", &self.slot.prefix)
            .finish()
    }
}

fn take(queue: &mut Queue, max: usize) -> WatchNext {
    if !queue.changes.is_empty() {
        let n = queue.changes.len().min(max.max(1));
        return WatchNext::Changes(queue.changes.drain(..n).collect());
    }
    match &queue.end {
        None => WatchNext::Pending,
        Some(End::Closed) => WatchNext::Ended,
        Some(End::Failed(_)) => match queue.end.replace(End::Closed) {
            Some(End::Failed(err)) => WatchNext::Failed(err),
            _ => unreachable!("matched above"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    fn rec(s: &str) -> Arc<[u8]> {
        Arc::from(s.as_bytes())
    }

    fn keys(next: WatchNext) -> Vec<String> {
        match next {
            WatchNext::Changes(events) => events.iter().map(|e| e.key.to_string()).collect(),
            other => panic!("expected changes, got {other:?}"),
        }
    }

    fn options(prefix: Option<&str>, high_water_mark: usize) -> WatchOptions {
        WatchOptions {
            prefix: prefix.map(str::to_string),
            high_water_mark,
        }
    }

    #[test]
    fn nobody_watching_leaves_the_changes_unread() {
        let hub = Arc::new(WatchHub::default());
        let read = AtomicBool::new(false);
        let value = rec("v");
        hub.publish(
            0,
            std::iter::from_fn(|| {
                read.store(true, Ordering::Relaxed);
                None::<(&str, &str, Option<&Arc<[u8]>>)>
            }),
        );
        assert!(
            !read.load(Ordering::Relaxed),
            "the iterator was not touched"
        );
        let w = hub
            .watch("m", 1, &WatchOptions::default(), || i64::MIN)
            .unwrap();
        hub.publish(0, [("m", "k", Some(&value))]);
        assert_eq!(keys(w.try_next(10)), ["k"]);
    }

    #[test]
    fn delivers_a_run_in_order_filtered_by_map_and_prefix() {
        let hub = Arc::new(WatchHub::default());
        let all = hub
            .watch("m", 1, &WatchOptions::default(), || i64::MIN)
            .unwrap();
        let some = hub
            .watch("m", 1, &options(Some("/a/"), 100), || i64::MIN)
            .unwrap();
        let other = hub
            .watch("n", 1, &WatchOptions::default(), || i64::MIN)
            .unwrap();
        let v = rec("v");
        hub.publish(
            0,
            [
                ("m", "/a/1", Some(&v)),
                ("m", "/b/1", Some(&v)),
                ("n", "/a/9", None),
                ("m", "/a/2", None),
            ],
        );
        assert_eq!(keys(all.try_next(100)), ["/a/1", "/b/1", "/a/2"]);
        match some.try_next(100) {
            WatchNext::Changes(events) => {
                assert_eq!(events.len(), 2);
                assert_eq!(&*events[0].key, "/a/1");
                assert_eq!(events[0].record.as_deref(), Some(&b"v"[..]));
                assert!(events[1].is_delete());
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(keys(other.try_next(100)), ["/a/9"]);
        assert!(matches!(all.try_next(100), WatchNext::Pending));
    }

    #[test]
    fn takes_at_most_max_per_read() {
        let hub = Arc::new(WatchHub::default());
        let w = hub
            .watch("m", 1, &WatchOptions::default(), || i64::MIN)
            .unwrap();
        let names: Vec<String> = (0..5).map(|i| format!("k{i}")).collect();
        hub.publish(0, names.iter().map(|k| ("m", k.as_str(), None)));
        assert_eq!(keys(w.try_next(2)), ["k0", "k1"]);
        assert_eq!(keys(w.try_next(2)), ["k2", "k3"]);
        assert_eq!(keys(w.try_next(2)), ["k4"]);
    }

    #[test]
    fn skips_positions_up_to_where_it_began() {
        let hub = Arc::new(WatchHub::default());
        let w = hub.watch("m", 1, &WatchOptions::default(), || 10).unwrap();
        hub.publish(9, [("m", "old", None)]);
        hub.publish(10, [("m", "acknowledged", None)]);
        hub.publish(11, [("m", "new", None)]);
        assert_eq!(keys(w.try_next(10)), ["new"]);
    }

    #[test]
    fn overflow_fails_once_frees_the_queue_then_ends() {
        let hub = Arc::new(WatchHub::default());
        let w = hub.watch("m", 1, &options(None, 3), || i64::MIN).unwrap();
        let keep = hub.watch("m", 1, &options(None, 100), || i64::MIN).unwrap();
        hub.publish(0, [("m", "a", None), ("m", "b", None)]);
        hub.publish(0, [("m", "c", None)]);
        assert!(!w.is_ended(), "exactly at the mark is fine");
        hub.publish(0, [("m", "d", None)]);
        assert!(w.is_ended());
        assert_eq!(w.slot.queue().changes.capacity(), 0, "memory freed at once");
        match w.try_next(10) {
            WatchNext::Failed(err) => {
                assert_eq!(err.code(), crate::ErrorCode::WatchOverflow);
                assert!(
                    err.to_string().contains("more than 3 changes behind"),
                    "{err}"
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(w.try_next(10), WatchNext::Ended));
        assert_eq!(keep.try_next(10).changes().len(), 4, "others unaffected");
        // The failed watcher stays counted until closed (its reader still has to hear).
        assert_eq!(hub.count("m"), 2);
        drop(w);
        assert_eq!(hub.count("m"), 1);
    }

    #[test]
    fn a_parked_reader_is_woken_once_per_park_and_by_close() {
        let hub = Arc::new(WatchHub::default());
        let w = hub
            .watch("m", 1, &WatchOptions::default(), || i64::MIN)
            .unwrap();
        let wakes = Arc::new(AtomicUsize::new(0));
        let waker = |wakes: &Arc<AtomicUsize>| -> WatchWaker {
            let wakes = wakes.clone();
            Box::new(move || {
                wakes.fetch_add(1, Ordering::SeqCst);
            })
        };
        assert!(matches!(w.poll(10, || waker(&wakes)), WatchNext::Pending));
        hub.publish(0, [("m", "first", None)]);
        hub.publish(0, [("m", "k", None)]);
        assert_eq!(wakes.load(Ordering::SeqCst), 1);
        assert_eq!(keys(w.poll(10, || waker(&wakes))), ["first", "k"]);
        assert!(matches!(w.poll(10, || waker(&wakes)), WatchNext::Pending));
        w.close();
        assert_eq!(wakes.load(Ordering::SeqCst), 2);
        assert!(matches!(w.try_next(10), WatchNext::Ended));
        hub.publish(0, [("m", "late", None)]);
        assert!(matches!(w.try_next(10), WatchNext::Ended));
    }

    #[test]
    fn closing_an_owner_ends_only_its_watchers() {
        let hub = Arc::new(WatchHub::default());
        let mine = hub
            .watch("m", 1, &WatchOptions::default(), || i64::MIN)
            .unwrap();
        let theirs = hub
            .watch("m", 2, &WatchOptions::default(), || i64::MIN)
            .unwrap();
        hub.publish(0, [("m", "k", None)]);
        hub.close_owner(1);
        assert!(
            matches!(mine.try_next(10), WatchNext::Ended),
            "unread changes dropped"
        );
        assert_eq!(keys(theirs.try_next(10)), ["k"]);
        assert_eq!(hub.count("m"), 1);
        drop(mine);
        assert_eq!(hub.count("m"), 1, "not counted twice");
        hub.fail_all(&Error::invalid("gap"));
        assert!(matches!(theirs.try_next(10), WatchNext::Failed(_)));
        assert!(matches!(theirs.try_next(10), WatchNext::Ended));
        assert_eq!(hub.count("m"), 0);
        assert!(!hub.is_watched());
    }

    #[test]
    fn a_thousand_watches_opened_and_ended_leave_nothing() {
        let hub = Arc::new(WatchHub::default());
        for i in 0..1000 {
            let w = hub
                .watch("m", 1, &options(Some(&format!("{i}")), 5), || i64::MIN)
                .unwrap();
            hub.publish(0, [("m", "1", None)]);
            if i % 2 == 0 {
                w.close();
            }
        }
        assert_eq!(hub.count("m"), 0);
        assert!(!hub.is_watched());
        assert!(hub.maps().is_empty());
    }

    #[test]
    fn runs_from_concurrent_publishers_are_never_interleaved() {
        let hub = Arc::new(WatchHub::default());
        let w = hub
            .watch("m", 1, &options(None, 1_000_000), || i64::MIN)
            .unwrap();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let hub = hub.clone();
                std::thread::spawn(move || {
                    for run in 0..500 {
                        let names: Vec<String> = (0..3).map(|i| format!("{t}/{run}/{i}")).collect();
                        hub.publish(0, names.iter().map(|k| ("m", k.as_str(), None)));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let all = keys(w.try_next(usize::MAX));
        assert_eq!(all.len(), 4 * 500 * 3);
        for run in all.chunks(3) {
            let heads: Vec<&str> = run.iter().map(|k| &k[..k.rfind('/').unwrap()]).collect();
            assert!(heads.iter().all(|h| *h == heads[0]), "split run: {run:?}");
        }
    }

    #[test]
    fn recv_waits_for_a_publisher_on_another_thread() {
        let hub = Arc::new(WatchHub::default());
        let w = hub
            .watch("m", 1, &WatchOptions::default(), || i64::MIN)
            .unwrap();
        assert!(matches!(
            w.recv(10, Some(Duration::from_millis(1))),
            WatchNext::Pending
        ));
        let publisher = {
            let hub = hub.clone();
            std::thread::spawn(move || hub.publish(0, [("m", "k", None)]))
        };
        assert_eq!(keys(w.recv(10, None)), ["k"]);
        publisher.join().unwrap();
    }

    #[test]
    fn wake_when_ready_calls_at_once_when_there_is_something() {
        let hub = Arc::new(WatchHub::default());
        let w = hub
            .watch("m", 1, &WatchOptions::default(), || i64::MIN)
            .unwrap();
        let wakes = Arc::new(AtomicUsize::new(0));
        let count = |wakes: &Arc<AtomicUsize>| -> WatchWaker {
            let wakes = wakes.clone();
            Box::new(move || {
                wakes.fetch_add(1, Ordering::SeqCst);
            })
        };
        w.wake_when_ready(count(&wakes));
        assert_eq!(wakes.load(Ordering::SeqCst), 0, "parked");
        hub.publish(0, [("m", "k", None)]);
        assert_eq!(wakes.load(Ordering::SeqCst), 1);
        w.wake_when_ready(count(&wakes));
        assert_eq!(
            wakes.load(Ordering::SeqCst),
            2,
            "called at once: a change is queued"
        );
        assert_eq!(keys(w.try_next(10)), ["k"]);
        w.close();
        w.wake_when_ready(count(&wakes));
        assert_eq!(wakes.load(Ordering::SeqCst), 3, "called at once: ended");
    }

    #[test]
    fn a_zero_high_water_mark_is_refused() {
        let hub = Arc::new(WatchHub::default());
        let err = hub
            .watch("m", 1, &options(None, 0), || i64::MIN)
            .unwrap_err();
        assert_eq!(err.code(), crate::ErrorCode::InvalidArgument);
        assert!(!hub.is_watched());
    }

    impl WatchNext {
        fn changes(self) -> Vec<WatchEvent> {
            match self {
                WatchNext::Changes(events) => events,
                other => panic!("expected changes, got {other:?}"),
            }
        }
    }
}
