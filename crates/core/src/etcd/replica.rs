//! The local replica of the prefix: every map's entries in a persistent sorted map (O(1)
//! snapshots for walks and counts), plus the lock keys that exist (so lock waiters wake on
//! the deletion they wait for, without a watch of their own). It is read once at one revision,
//! then fed by one watch of the whole prefix from the next revision.
//!
//! A process's own commits are applied as soon as etcd answers, before the watch brings them
//! ("ahead" of the watch): each such key remembers its revision until the watch passes it, so
//! an older event still in flight cannot undo it. A watch whose start revision was compacted
//! away is answered by reading the prefix again; a broken watch stream (a member gone) is
//! opened again from the last revision seen + 1.
//!
//! A cluster replaced under the process (wiped and started afresh, restored, another cluster on
//! the same endpoints) shows as another cluster id in an answer's header, or a revision below
//! one the replica had already applied (a watch reporting less than it started after, a sync's
//! write answered below the replica's revision). A linearizable read confirms it; then the
//! prefix is read again as after a compaction, except that nothing applied ahead is kept (its
//! revisions were the old cluster's), every lock key the replica held that is gone is reported
//! deleted (their locks lost), the core's `replaced` hook runs (the session's lease is lost,
//! the format record checked again) and every wait wakes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use etcd_client::{EventType, ResponseHeader, WatchOptions};
use tokio::sync::{oneshot, watch};

use crate::error::{Error, Result};
use crate::watch::WatchHub;

use super::client::Cluster;
use super::layout::{prefix_end, Layout, Parsed};

/// One map's entries: key → record (envelope bytes), in byte-wise key order.
pub type Snapshot = imbl::OrdMap<String, Arc<[u8]>>;

/// A lock key seen deleted: (table, key, lease, revision of the deletion).
pub(crate) type LockDeleted = (String, String, i64, i64);

/// A change this process knows was committed: (table, key, record or None for a deletion).
pub(crate) type Known<'a> = (&'a str, &'a str, Option<Arc<[u8]>>);

/// A data event for the watches: (revision, table, key, record or None for a deletion).
type Watched = (i64, String, String, Option<Arc<[u8]>>);

/// One map as of a revision: (name, codec, entries).
pub type NamedSnapshot = (String, String, Snapshot);

#[derive(Default)]
struct State {
    /// Every event up to this revision is applied.
    revision: i64,
    tables: HashMap<String, Snapshot>,
    /// (table, key) applied ahead of the watch → the revision it was applied at.
    ahead: HashMap<(String, String), i64>,
    /// Lock keys that exist → their create revision.
    lock_keys: HashMap<Box<[u8]>, i64>,
}

impl State {
    fn set(&mut self, table: &str, key: &str, value: Option<Arc<[u8]>>) {
        match value {
            Some(value) => {
                self.tables
                    .entry(table.to_string())
                    .or_default()
                    .insert(key.to_string(), value);
            }
            None => {
                if let Some(map) = self.tables.get_mut(table) {
                    map.remove(key);
                }
            }
        }
    }
}

#[derive(Default)]
struct Waits {
    /// Woken once the replica's revision reaches the number.
    revision: Vec<(i64, oneshot::Sender<()>)>,
    /// Woken once the lock key (at that create revision) is gone as of a revision at least the
    /// number: (key, create revision, revision, sender). The create revision, not the name, since
    /// a name is reused per lease: deleted and put again before the replica applies both, the
    /// name is still there but the predecessor is not.
    lock_gone: Vec<LockWait>,
}

/// A wait for a lock key to go: (key, its create revision, as of revision, sender).
type LockWait = (Box<[u8]>, i64, i64, oneshot::Sender<()>);

/// Counters for stats.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplicaStats {
    /// Every change up to this etcd revision is in the replica.
    pub revision: i64,
    /// The newest cluster revision this process has seen minus `revision`: how far the replica
    /// may be behind (revisions of other prefixes count too, so it is an upper bound).
    pub lag: i64,
    /// Whether the watch that feeds the replica is connected.
    pub connected: bool,
    /// Times the prefix was read whole again (a compacted watch revision).
    pub reloads: u64,
}

pub(crate) struct Replica {
    layout: Layout,
    state: RwLock<State>,
    waits: Mutex<Waits>,
    /// The newest revision seen in any answer from the cluster.
    seen: AtomicI64,
    connected: AtomicBool,
    reloads: AtomicU64,
    /// The cluster id of the answers (0 until the first), to tell another cluster.
    cluster_id: AtomicU64,
    /// Checks of the cluster asked for ([`Replica::recheck`]), and those done.
    recheck: watch::Sender<u64>,
    rechecked: watch::Sender<u64>,
    /// Test hook: the watch is dropped and not reopened while set.
    paused: watch::Sender<bool>,
    /// How many lock waits were registered so far (for tests).
    lock_waits: watch::Sender<u64>,
    closed: watch::Sender<bool>,
    /// The watches of this prefix's maps: each watch answer's changes are published to them,
    /// one revision (one etcd transaction) per run.
    pub(crate) watchers: Arc<WatchHub>,
}

impl Replica {
    pub fn new(layout: Layout) -> Replica {
        Replica {
            layout,
            state: RwLock::default(),
            waits: Mutex::default(),
            seen: AtomicI64::new(0),
            connected: AtomicBool::new(false),
            reloads: AtomicU64::new(0),
            cluster_id: AtomicU64::new(0),
            recheck: watch::channel(0).0,
            rechecked: watch::channel(0).0,
            paused: watch::channel(false).0,
            lock_waits: watch::channel(0).0,
            closed: watch::channel(false).0,
            watchers: Arc::default(),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    fn waits(&self) -> std::sync::MutexGuard<'_, Waits> {
        self.waits.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn saw_revision(&self, revision: i64) {
        // SeqCst: a watch that begins reads it after it counts (see `WatchHub::watch`).
        self.seen.fetch_max(revision, Ordering::SeqCst);
    }

    /// The newest revision seen in any answer from the cluster.
    pub fn seen(&self) -> i64 {
        self.seen.load(Ordering::SeqCst)
    }

    pub fn get(&self, table: &str, key: &str) -> Option<Arc<[u8]>> {
        self.read().tables.get(table)?.get(key).cloned()
    }

    pub fn snapshot(&self, table: &str) -> Snapshot {
        self.read().tables.get(table).cloned().unwrap_or_default()
    }

    pub fn stats(&self) -> ReplicaStats {
        let revision = self.read().revision;
        ReplicaStats {
            revision,
            lag: (self.seen.load(Ordering::Relaxed) - revision).max(0),
            connected: self.connected.load(Ordering::Relaxed),
            reloads: self.reloads.load(Ordering::Relaxed),
        }
    }

    /// Applies changes this process knows were committed at `revision` (its own commits, a
    /// value read under a lock just granted), ahead of the watch.
    pub fn apply_known(&self, revision: i64, changes: &[Known<'_>]) {
        self.saw_revision(revision);
        let mut state = self.write();
        if revision <= state.revision {
            return;
        }
        for (table, key, value) in changes {
            let slot = state
                .ahead
                .entry((table.to_string(), key.to_string()))
                .or_insert(0);
            if *slot >= revision {
                continue;
            }
            *slot = revision;
            state.set(table, key, value.clone());
        }
    }

    /// Reads the whole prefix at one revision and installs it (keeping what this process
    /// applied ahead of that revision). The caller wakes the waits. Returns the root of a store
    /// found nested inside this prefix, if any (see [`super::layout::nested_root`]).
    pub async fn load(&self, cluster: &Cluster) -> Result<Option<String>> {
        Ok(self.load_as(cluster, false).await?.0)
    }

    /// As [`Replica::load`]; also returns every lock key the replica held
    /// that the new read lacks (deleted meanwhile, at the read's revision). `replaced`: the
    /// cluster is another one (wiped, restored, replaced) than the one the replica was read
    /// from, whose revisions mean nothing here: nothing applied ahead is kept, the newest
    /// revision seen starts again from the read's, and the lock keys gone are reported at
    /// revision `i64::MAX` (their fences are the old cluster's revisions).
    async fn load_as(
        &self,
        cluster: &Cluster,
        replaced: bool,
    ) -> Result<(Option<String>, Vec<LockDeleted>)> {
        let root = self.layout.root().as_bytes().to_vec();
        let mut tables: HashMap<String, Snapshot> = HashMap::new();
        let mut lock_keys = HashMap::new();
        let mut nested = None;
        let revision = cluster
            .scan(&root, &prefix_end(&root), |kv| {
                if nested.is_none() {
                    nested = self.layout.nested_root(kv.key(), kv.value());
                }
                match self.layout.parse(kv.key()) {
                    Parsed::Data { table, key } => {
                        tables
                            .entry(table)
                            .or_default()
                            .insert(key, Arc::from(kv.value()));
                    }
                    Parsed::Lock { .. } => {
                        lock_keys.insert(Box::from(kv.key()), kv.create_revision());
                    }
                    Parsed::Other => {}
                }
            })
            .await?;
        if replaced {
            self.seen.store(revision, Ordering::SeqCst);
        } else {
            self.saw_revision(revision);
        }
        let gone_at = if replaced { i64::MAX } else { revision };
        let mut gone = Vec::new();
        {
            let mut state = self.write();
            let old = std::mem::take(&mut *state);
            state.revision = revision;
            state.tables = tables;
            state.lock_keys = lock_keys;
            for (key, created) in &old.lock_keys {
                if state.lock_keys.get(key) == Some(created) {
                    continue;
                }
                if let Parsed::Lock { table, key, lease } = self.layout.parse(key) {
                    gone.push((table, key, lease, gone_at));
                }
            }
            for ((table, key), at) in old.ahead {
                if at > revision && !replaced {
                    let value = old.tables.get(&table).and_then(|t| t.get(&key)).cloned();
                    state.set(&table, &key, value);
                    state.ahead.insert((table, key), at);
                }
            }
        }
        Ok((nested, gone))
    }

    /// Whether an answer's header shows another cluster than the one the replica was read
    /// from: another cluster id, or a revision below `floor` (a revision the replica had
    /// applied before the request was sent; a cluster's revisions never go back). Suspicious
    /// only: [`Replica::recheck`] confirms with a linearizable read.
    pub fn suspicious(&self, header: Option<&ResponseHeader>, floor: i64) -> bool {
        let Some(header) = header else {
            return false;
        };
        let id = header.cluster_id();
        let known =
            match self
                .cluster_id
                .compare_exchange(0, id, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => id,
                Err(known) => known,
            };
        (id != 0 && known != id) || header.revision() < floor
    }

    /// Has the replica's task check (with a linearizable read) whether the cluster is still
    /// the one it was read from, and reload it if not; resolves once that check is done.
    pub async fn recheck(&self) -> Result<()> {
        let mut asked = 0;
        self.recheck.send_modify(|n| {
            *n += 1;
            asked = *n;
        });
        let mut done = self.rechecked.subscribe();
        let mut closed = self.closed.subscribe();
        tokio::select! {
            r = done.wait_for(|n| *n >= asked) => r.map(|_| ()).map_err(|_| Error::StoreClosed),
            _ = closed.wait_for(|c| *c) => Err(Error::StoreClosed),
        }
    }

    /// Applies one watch answer; returns the lock keys it saw deleted.
    fn apply_events(&self, events: &[etcd_client::Event]) -> Vec<LockDeleted> {
        let mut deleted = Vec::new();
        // Every data event of the answer, for the watches.
        let mut changes: Vec<Watched> = Vec::new();
        let watched = self.watchers.is_watched();
        let mut state = self.write();
        for event in events {
            let Some(kv) = event.kv() else { continue };
            let revision = kv.mod_revision();
            let put = event.event_type() == EventType::Put;
            match self.layout.parse(kv.key()) {
                Parsed::Data { table, key } => {
                    let id = (table, key);
                    let value: Option<Arc<[u8]>> = put.then(|| Arc::from(kv.value()));
                    if watched {
                        // Also this process's own commits, applied ahead: watches hear them now,
                        // in revision order.
                        changes.push((revision, id.0.clone(), id.1.clone(), value.clone()));
                    }
                    if state.ahead.get(&id).is_some_and(|&at| revision <= at) {
                        continue;
                    }
                    state.set(&id.0, &id.1, value);
                }
                Parsed::Lock { table, key, lease } => {
                    if put {
                        state
                            .lock_keys
                            .insert(Box::from(kv.key()), kv.create_revision());
                    } else {
                        state.lock_keys.remove(kv.key());
                        deleted.push((table, key, lease, revision));
                    }
                }
                Parsed::Other => {}
            }
            state.revision = state.revision.max(revision);
        }
        let now = state.revision;
        if !state.ahead.is_empty() {
            state.ahead.retain(|_, at| *at > now);
        }
        drop(state);
        self.saw_revision(now);
        // One run per revision (one etcd transaction), before the waits wake: a sync() that
        // returns has every watch told.
        for run in changes.chunk_by(|a, b| a.0 == b.0) {
            self.watchers.publish(
                run[0].0,
                run.iter()
                    .map(|(_, table, key, record)| (table.as_str(), key.as_str(), record.as_ref())),
            );
        }
        deleted
    }

    /// Wakes the waits that are satisfied now.
    fn wake(&self) {
        let state = self.read();
        let mut waits = self.waits();
        let revision = state.revision;
        let mut woken = Vec::new();
        let (done, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut waits.revision)
            .into_iter()
            .partition(|(at, _)| *at <= revision);
        waits.revision = kept;
        woken.extend(done.into_iter().map(|(_, tx)| tx));
        let (done, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut waits.lock_gone)
            .into_iter()
            .partition(|(key, created, at, tx)| {
                tx.is_closed() || (*at <= revision && state.lock_keys.get(key) != Some(created))
            });
        waits.lock_gone = kept;
        woken.extend(done.into_iter().map(|(_, _, _, tx)| tx));
        drop(waits);
        drop(state);
        for tx in woken {
            let _ = tx.send(());
        }
    }

    /// Resolves once every change up to `revision` is in the replica.
    pub fn reached(&self, revision: i64) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        self.waits().revision.push((revision, tx));
        self.wake();
        rx
    }

    /// Resolves once `lock_key` created at `created` is gone (deleted, or put again with another
    /// create revision) as of a revision at least `after`.
    pub fn lock_gone(&self, lock_key: &[u8], created: i64, after: i64) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        self.waits()
            .lock_gone
            .push((Box::from(lock_key), created, after, tx));
        self.lock_waits.send_modify(|n| *n += 1);
        self.wake();
        rx
    }

    pub fn revision(&self) -> i64 {
        self.read().revision
    }

    /// Test hook: drop the watch (the replica falls behind) or let it resume.
    pub fn pause(&self, paused: bool) {
        self.paused.send_replace(paused);
    }

    /// Test hook: the count of lock waits registered so far, to wait on.
    pub fn lock_waits(&self) -> watch::Receiver<u64> {
        self.lock_waits.subscribe()
    }

    pub fn close(&self) {
        self.closed.send_replace(true);
    }

    /// Wakes every wait: after the cluster was found replaced, the revisions they wait for
    /// were the old cluster's (the replica now holds all of the new one as of its read), and
    /// the lock keys waited on are gone with the old cluster.
    fn wake_all(&self) {
        let woken: Vec<oneshot::Sender<()>> = {
            let mut waits = self.waits();
            let revision = std::mem::take(&mut waits.revision);
            let locks = std::mem::take(&mut waits.lock_gone);
            revision
                .into_iter()
                .map(|(_, tx)| tx)
                .chain(locks.into_iter().map(|(_, _, _, tx)| tx))
                .collect()
        };
        for tx in woken {
            let _ = tx.send(());
        }
    }

    /// A linearizable read: whether the cluster is another than the one the replica holds
    /// (another cluster id, or a revision below the replica's).
    async fn is_replaced(&self, cluster: &Cluster) -> Result<bool> {
        let key = format!("{}meta/format", self.layout.root());
        let answer = cluster
            .call(
                "checking the cluster",
                super::client::Effect::Nothing,
                || {
                    let mut kv = cluster.kv.clone();
                    let key = key.clone();
                    async move { kv.get(key, None).await }
                },
            )
            .await?;
        let Some(header) = answer.header() else {
            return Ok(false);
        };
        let known = self.cluster_id.load(Ordering::SeqCst);
        let replaced = (header.cluster_id() != 0 && known != 0 && header.cluster_id() != known)
            || header.revision() < self.revision();
        if replaced {
            self.cluster_id.store(header.cluster_id(), Ordering::SeqCst);
        }
        Ok(replaced)
    }

    /// Feeds the replica until closed. `deleted` hears of every lock key seen deleted (also of
    /// those gone from a read of the whole prefix); `replaced` runs once the replica found the
    /// cluster replaced (wiped and started afresh, or another one) and read it again, before
    /// any wait wakes.
    pub async fn run<R, F>(
        self: Arc<Replica>,
        cluster: Cluster,
        deleted: impl Fn(Vec<LockDeleted>),
        replaced: R,
    ) where
        R: Fn() -> F,
        F: std::future::Future<Output = ()>,
    {
        let mut closed = self.closed.subscribe();
        let mut paused = self.paused.subscribe();
        let mut rechecks = self.recheck.subscribe();
        let mut pause = Duration::from_millis(50);
        let mut reload = false;
        // A check of the cluster is due (asked for, or the watch's answers were suspicious).
        let mut check = false;
        while !*closed.borrow() {
            if *paused.borrow() {
                self.connected.store(false, Ordering::Relaxed);
                tokio::select! {
                    _ = paused.wait_for(|p| !*p) => {}
                    _ = closed.wait_for(|c| *c) => return,
                }
            }
            if check || rechecks.has_changed().unwrap_or(false) {
                let asked = *rechecks.borrow_and_update();
                let checked = match self.is_replaced(&cluster).await {
                    Ok(true) => self
                        .load_as(&cluster, true)
                        .await
                        .map(|(_, gone)| Some(gone)),
                    Ok(false) => Ok(None),
                    Err(err) => Err(err),
                };
                match checked {
                    Ok(None) => {}
                    Ok(Some(gone)) => {
                        self.watchers.fail_all(&Error::WatchOverflow {
                            message: concat!(
                                "the watch missed changes: the etcd cluster was replaced ",
                                "(wiped and started afresh, or another cluster) and the ",
                                "store's replica read it again; read the map again and ",
                                "watch anew"
                            )
                            .into(),
                        });
                        self.reloads.fetch_add(1, Ordering::Relaxed);
                        reload = false;
                        if !gone.is_empty() {
                            deleted(gone);
                        }
                        replaced().await;
                        self.wake_all();
                        self.wake();
                    }
                    Err(_) => {
                        // The cluster is away (or the reload failed): check again when it
                        // answers.
                        check = true;
                        tokio::select! {
                            _ = tokio::time::sleep(pause) => {}
                            _ = closed.wait_for(|c| *c) => return,
                        }
                        pause = (pause * 2).min(Duration::from_secs(1));
                        continue;
                    }
                }
                check = false;
                self.rechecked.send_modify(|n| *n = (*n).max(asked));
            }
            if reload {
                match self.load_as(&cluster, false).await {
                    Ok((_, gone)) => {
                        // What changed between the compacted revision and now cannot be
                        // replayed: the watches end rather than skip it silently.
                        self.watchers.fail_all(&Error::WatchOverflow {
                            message: concat!(
                                "the watch missed changes: the store's replica fell behind a ",
                                "compacted etcd revision and read the prefix again; read the ",
                                "map again and watch anew"
                            )
                            .into(),
                        });
                        self.reloads.fetch_add(1, Ordering::Relaxed);
                        if !gone.is_empty() {
                            deleted(gone);
                        }
                        self.wake();
                        reload = false;
                    }
                    Err(_) => {
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(1));
                        continue;
                    }
                }
            }
            let from = self.revision() + 1;
            let options = WatchOptions::new().with_prefix().with_start_revision(from);
            let mut client = cluster.watch.clone();
            let root = self.layout.root().to_string();
            let opened =
                tokio::time::timeout(cluster.timeout, client.watch(root, Some(options))).await;
            let mut stream = match opened {
                Ok(Ok(stream)) => stream,
                _ => {
                    self.connected.store(false, Ordering::Relaxed);
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = closed.wait_for(|c| *c) => return,
                    }
                    pause = (pause * 2).min(Duration::from_secs(1));
                    continue;
                }
            };
            loop {
                let message = tokio::select! {
                    m = stream.message() => m,
                    _ = paused.wait_for(|p| *p) => break,
                    _ = closed.wait_for(|c| *c) => return,
                    _ = rechecks.changed() => {
                        check = true;
                        break;
                    }
                };
                let answer = match message {
                    Ok(Some(answer)) => answer,
                    _ => break,
                };
                if answer.canceled() {
                    if answer.compact_revision() > 0 || answer.cancel_reason().contains("compacted")
                    {
                        reload = true;
                    }
                    break;
                }
                // Every revision this watch reports is at least the one it started after: a
                // lower one (or another cluster id) is a cluster that went back.
                if self.suspicious(answer.header(), from - 1) {
                    check = true;
                    break;
                }
                if answer.created() {
                    self.connected.store(true, Ordering::Relaxed);
                    pause = Duration::from_millis(50);
                }
                if let Some(header) = answer.header() {
                    self.saw_revision(header.revision());
                }
                if !answer.events().is_empty() {
                    let gone = self.apply_events(answer.events());
                    self.wake();
                    if !gone.is_empty() {
                        deleted(gone);
                    }
                }
            }
            self.connected.store(false, Ordering::Relaxed);
            if !reload && !check {
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = closed.wait_for(|c| *c) => return,
                    _ = rechecks.changed() => check = true,
                }
                pause = (pause * 2).min(Duration::from_secs(1));
            }
        }
    }
}
