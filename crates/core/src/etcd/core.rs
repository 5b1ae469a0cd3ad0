//! The core shared by every handle of one cluster and prefix in the process: the client, the
//! session, the replica, the tables' locks and key sequences, and the committer.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp};

use crate::error::{Error, Result};
use crate::keys::KeyFormat;
use crate::sequence::KeySequence;
use crate::MapOptions;

use super::batcher::TxnBatcher;
use super::client::{runtime, txn_first_values, Cluster, Effect};
use super::commits::{CommitQueue, CommitStats};
use super::layout::{prefix_end, unescape_table, Layout, Parsed, LAYOUT_VERSION};
use super::locks::KeyLocks;
use super::replica::{NamedSnapshot, Replica, Snapshot};
use super::session::Session;
use super::url::ClusterUrl;
use super::ClusterOptions;

/// One map's shared state in this process.
pub(crate) struct TableState {
    pub name: String,
    pub codec: String,
    pub locks: KeyLocks,
    /// The format auto keys are generated in: recorded in the cluster, else set by the first
    /// opener here that generates one.
    key_format: Mutex<Option<KeyFormat>>,
    pub sequence: Mutex<KeySequence>,
    /// The end of this process's last lease, and the mod revision it wrote the counter at
    /// (a clean close gives the rest back only if nobody leased after it).
    pub lease: Mutex<(u64, i64)>,
}

impl TableState {
    pub fn sequence(&self) -> MutexGuard<'_, KeySequence> {
        self.sequence.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn lease(&self) -> MutexGuard<'_, (u64, i64)> {
        self.lease.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The format to generate keys in for an opener that asked for `wanted`.
    pub fn check_key_format(&self, wanted: KeyFormat) -> Result<KeyFormat> {
        let mut format = self.key_format.lock().unwrap_or_else(|p| p.into_inner());
        match *format {
            Some(recorded) if recorded != wanted => Err(Error::invalid(format!(
                "table '{}' generates auto keys of width {} in base {}; this store was opened \
                 with width {} in base {}",
                self.name, recorded.width, recorded.base, wanted.width, wanted.base
            ))),
            _ => Ok(*format.get_or_insert(wanted)),
        }
    }
}

pub(crate) struct Core {
    pub url: ClusterUrl,
    pub layout: Layout,
    pub cluster: Cluster,
    pub session: Arc<Session>,
    pub replica: Arc<Replica>,
    tables: Mutex<HashMap<String, Arc<TableState>>>,
    pub commits: CommitQueue,
    /// Shares etcd transactions between the lock requests of different keys.
    pub locker: TxnBatcher,
    pub stats: Arc<CommitStats>,
    closed: AtomicBool,
    /// Why the store may no longer be used (see [`Core::refuse`]).
    refused: Mutex<Option<Error>>,
    me: Weak<Core>,
}

impl Core {
    /// Connects, checks the layout version, starts the session and reads the replica.
    pub async fn open(url: ClusterUrl, options: &ClusterOptions) -> Result<Arc<Core>> {
        let cluster = Cluster::connect(&url, options).await?;
        let layout = Layout::new(&url.prefix);
        let created = check_format(&cluster, &layout, &url).await?;
        let undo = |err: Error| async {
            if let Some(created) = created {
                forget_format(&cluster, &layout, created).await;
            }
            err
        };
        let session = match Session::start(cluster.clone(), options.session_ttl).await {
            Ok(session) => session,
            Err(err) => return Err(undo(err).await),
        };
        let replica = Arc::new(Replica::new(layout.clone()));
        let refused = match replica.load(&cluster).await {
            Ok(None) => None,
            Ok(Some(inner)) => Some(nested_error(&inner, &url.prefix)),
            Err(err) => Some(err),
        };
        if let Some(err) = refused {
            // Before the session's close, which closes the connection.
            let err = undo(err).await;
            session.close().await;
            return Err(err);
        }
        let stats = Arc::new(CommitStats::default());
        let core = Arc::new_cyclic(|weak| Core {
            commits: CommitQueue::start(weak.clone(), stats.clone()),
            locker: TxnBatcher::start(cluster.clone()),
            url,
            layout,
            cluster: cluster.clone(),
            session: session.clone(),
            replica: replica.clone(),
            tables: Mutex::default(),
            stats,
            closed: AtomicBool::new(false),
            refused: Mutex::default(),
            me: weak.clone(),
        });
        runtime().spawn(session.keep_alive());
        let weak = Arc::downgrade(&core);
        let replaced = weak.clone();
        runtime().spawn(replica.run(
            cluster,
            move |deleted| {
                if let Some(core) = weak.upgrade() {
                    core.lock_keys_deleted(deleted);
                }
            },
            move || {
                let core = replaced.upgrade();
                async move {
                    if let Some(core) = core {
                        core.cluster_replaced().await;
                    }
                }
            },
        ));
        Ok(core)
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// The replica found the cluster replaced (wiped and started afresh, or another cluster)
    /// and read it again; it reported this process's lock keys that are gone (their locks are
    /// lost). The session's lease went with the old cluster: lost too, so that later locks
    /// take a new one. The format record is checked again: recorded anew in an empty cluster,
    /// or the store refused (see [`Core::refused`]) when the new cluster holds an incompatible
    /// layout or another store around this one.
    async fn cluster_replaced(&self) {
        if let Some(lease) = self.session.current() {
            let mut client = self.cluster.lease.clone();
            let alive =
                tokio::time::timeout(self.cluster.timeout, client.time_to_live(lease.id, None))
                    .await;
            match alive {
                Ok(Ok(answer)) if answer.ttl() > 0 => {}
                Ok(Ok(_)) => self.session.lost(lease.id),
                Ok(Err(err)) if err.to_string().contains("not found") => {
                    self.session.lost(lease.id)
                }
                // Unknown: the keep-alive finds out.
                _ => self.session.check_now(),
            }
        }
        match check_format(&self.cluster, &self.layout, &self.url).await {
            Ok(_) => {}
            // Not known either way; the next open checks it.
            Err(Error::Unavailable { .. }) => {}
            Err(err) => self.refuse(err),
        }
    }

    /// The cluster under the store changed into one it may not use: every later call that
    /// reaches the cluster fails with `err`, commits with StoreClosed; the replica stops.
    fn refuse(&self, err: Error) {
        *self.refused.lock().unwrap_or_else(|p| p.into_inner()) = Some(err);
        self.closed.store(true, Ordering::SeqCst);
        self.replica.close();
        if let Some(core) = self.me.upgrade() {
            runtime().spawn(async move { core.commits.stop().await });
        }
    }

    /// Set once the store was refused after the cluster changed under it.
    pub fn refused(&self) -> Result<()> {
        match &*self.refused.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(err) => Err(err.clone()),
            None => Ok(()),
        }
    }

    fn lock_keys_deleted(&self, deleted: Vec<super::replica::LockDeleted>) {
        for (table, key, lease, revision) in deleted {
            if !self.session.is_ours(lease) {
                continue;
            }
            let state = self.tables().get(&table).cloned();
            let lost = state.is_some_and(|s| s.locks.etcd_key_deleted(&key, lease, revision));
            if lost && self.session.is_live(lease) {
                // Revoked or expired, or deleted by hand: the keep-alive finds out which.
                self.session.check_now();
            }
        }
    }

    fn tables(&self) -> MutexGuard<'_, HashMap<String, Arc<TableState>>> {
        self.tables.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn all_tables(&self) -> Vec<Arc<TableState>> {
        self.tables().values().cloned().collect()
    }

    /// The table's state, recording its codec in the cluster on first use.
    pub async fn table(&self, name: &str, options: &MapOptions) -> Result<Arc<TableState>> {
        self.refused()?;
        if let Some(table) = self.tables().get(name) {
            if table.codec != options.codec {
                return Err(Error::CodecMismatch {
                    table: name.into(),
                    stored: table.codec.clone(),
                    requested: options.codec.clone(),
                });
            }
            return Ok(table.clone());
        }
        let codec_key = self.layout.codec_key(name);
        let seq_key = self.layout.seq_key(name);
        let keys_key = self.layout.keys_key(name);
        let txn = Txn::new()
            .when([Compare::create_revision(
                codec_key.clone(),
                CompareOp::Equal,
                0,
            )])
            .and_then([
                TxnOp::put(codec_key.clone(), options.codec.clone(), None),
                TxnOp::get(seq_key.clone(), None),
                TxnOp::get(keys_key.clone(), None),
            ])
            .or_else([
                TxnOp::get(codec_key, None),
                TxnOp::get(seq_key, None),
                TxnOp::get(keys_key, None),
            ]);
        let answer = self
            .cluster
            .call(&format!("opening map '{name}'"), Effect::Unknown, || {
                let mut kv = self.cluster.kv.clone();
                let txn = txn.clone();
                async move { kv.txn(txn).await }
            })
            .await?;
        let values = txn_first_values(&answer);
        if !answer.succeeded() {
            let stored = String::from_utf8_lossy(values[0].as_deref().unwrap_or_default());
            if stored != options.codec {
                return Err(Error::CodecMismatch {
                    table: name.into(),
                    stored: stored.into_owned(),
                    requested: options.codec.clone(),
                });
            }
        }
        let leased_until = values[1]
            .as_deref()
            .map(|v| parse_counter(v, name))
            .transpose()?
            .unwrap_or(0);
        let key_format = values[2].as_deref().and_then(KeyFormat::decode);
        let mut tables = self.tables();
        // Another thread may have opened it meanwhile: use the first.
        let table = tables.entry(name.to_string()).or_insert_with(|| {
            Arc::new(TableState {
                name: name.to_string(),
                codec: options.codec.clone(),
                locks: KeyLocks::new(),
                key_format: Mutex::new(key_format),
                sequence: Mutex::new(KeySequence::new(leased_until, options.bandwidth)),
                lease: Mutex::new((leased_until, 0)),
            })
        });
        if table.codec != options.codec {
            return Err(Error::CodecMismatch {
                table: name.into(),
                stored: table.codec.clone(),
                requested: options.codec.clone(),
            });
        }
        Ok(table.clone())
    }

    /// The maps recorded under the prefix, with their codecs.
    pub async fn list_tables(&self) -> Result<Vec<(String, String)>> {
        self.refused()?;
        let prefix = self.layout.codec_prefix();
        let answer = self
            .cluster
            .call("listing the maps", Effect::Nothing, || {
                let mut kv = self.cluster.kv.clone();
                let prefix = prefix.clone();
                async move { kv.get(prefix, Some(GetOptions::new().with_prefix())).await }
            })
            .await?;
        let mut tables: Vec<(String, String)> = answer
            .kvs()
            .iter()
            .map(|kv| {
                let name = &kv.key()[prefix.len()..];
                (
                    unescape_table(&String::from_utf8_lossy(name)),
                    String::from_utf8_lossy(kv.value()).into_owned(),
                )
            })
            .collect();
        tables.sort();
        Ok(tables)
    }

    /// A write that every replica sees: once the replica has it, it has everything committed
    /// anywhere before. Returns its revision.
    ///
    /// Its answer's revision below the replica's (or another cluster id) means the cluster was
    /// replaced under the process: then it returns once the replica has checked that with a
    /// linearizable read and, if so, read the new cluster (see [`Replica::recheck`]).
    pub async fn barrier_revision(&self) -> Result<i64> {
        self.refused()?;
        let key = format!("{}meta/sync", self.layout.root());
        let floor = self.replica.revision();
        let answer = self
            .cluster
            .call("syncing with the cluster", Effect::Nothing, || {
                let mut kv = self.cluster.kv.clone();
                let key = key.clone();
                async move { kv.put(key, "", None).await }
            })
            .await?;
        let revision = answer.header().map_or(0, |h| h.revision());
        if self.replica.suspicious(answer.header(), floor) {
            match tokio::time::timeout(self.cluster.timeout, self.replica.recheck()).await {
                Ok(checked) => checked?,
                Err(_) => {
                    return Err(Error::Unavailable {
                        message: format!(
                            "etcd answered with revision {revision}, below the replica's \
                             {floor} (the cluster was wiped or replaced?), and the replica did \
                             not check it within {:?}",
                            self.cluster.timeout
                        ),
                    })
                }
            }
            self.refused()?;
        }
        self.replica.saw_revision(revision);
        Ok(revision)
    }

    /// Waits until the replica holds everything committed anywhere before the call.
    pub async fn sync(&self) -> Result<()> {
        let revision = self.barrier_revision().await?;
        let reached = self.replica.reached(revision);
        match tokio::time::timeout(self.cluster.timeout, reached).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(Error::StoreClosed),
            Err(_) => Err(Error::Unavailable {
                message: format!(
                    "the replica did not reach revision {revision} within {:?} (the watch \
                     is behind or disconnected); nothing was written",
                    self.cluster.timeout
                ),
            }),
        }
    }

    /// Compacts the cluster's history up to its current revision.
    pub async fn compact(&self) -> Result<()> {
        let revision = self.barrier_revision().await?;
        let compacted = self
            .cluster
            .call("compacting the history", Effect::Nothing, || {
                let mut kv = self.cluster.kv.clone();
                async move { kv.compact(revision, None).await }
            })
            .await;
        match compacted {
            Ok(_) => Ok(()),
            // Compacted up to here or beyond already.
            Err(Error::Unavailable { message }) if message.contains("compacted") => Ok(()),
            Err(err) => Err(err),
        }
    }

    /// Every map, read from the cluster at one revision.
    ///
    /// The prefix is read page by page at the revision of the first page; a compaction of that
    /// revision meanwhile (a `compact()` racing the backup) breaks the later pages. Then the
    /// whole read starts again at a new revision, and after [`PAGED_SNAPSHOT_TRIES`] such
    /// failures the prefix is read in one request (one answer cannot be broken by a
    /// compaction; it costs one large response instead of pages).
    pub async fn snapshot_all(&self) -> Result<(i64, Vec<NamedSnapshot>)> {
        self.refused()?;
        let root = self.layout.root().as_bytes().to_vec();
        let codec_prefix = self.layout.codec_prefix();
        let mut tries = 0;
        let (revision, mut maps, codecs) = loop {
            tries += 1;
            let mut maps: HashMap<String, Snapshot> = HashMap::new();
            let mut codecs: HashMap<String, String> = HashMap::new();
            let mut each = |kv: &etcd_client::KeyValue| {
                if let Some(name) = kv.key().strip_prefix(codec_prefix.as_bytes()) {
                    codecs.insert(
                        unescape_table(&String::from_utf8_lossy(name)),
                        String::from_utf8_lossy(kv.value()).into_owned(),
                    );
                } else if let Parsed::Data { table, key } = self.layout.parse(kv.key()) {
                    maps.entry(table)
                        .or_default()
                        .insert(key, Arc::from(kv.value()));
                }
            };
            let read = if tries > PAGED_SNAPSHOT_TRIES {
                self.read_whole_prefix(&mut each).await
            } else {
                self.cluster
                    .scan(&root, &prefix_end(&root), &mut each)
                    .await
            };
            match read {
                Ok(revision) => break (revision, maps, codecs),
                // The revision of the first page was compacted away: start again.
                Err(Error::Unavailable { message })
                    if tries <= PAGED_SNAPSHOT_TRIES && message.contains("compacted") => {}
                Err(err) => return Err(err),
            }
        };
        let mut all: Vec<NamedSnapshot> = codecs
            .into_iter()
            .map(|(name, codec)| {
                let map = maps.remove(&name).unwrap_or_default();
                (name, codec, map)
            })
            .collect();
        // Data of a map without a recorded codec (written by hand) still comes along.
        all.extend(
            maps.into_iter()
                .map(|(name, map)| (name, "raw".to_string(), map)),
        );
        all.sort_by(|a, b| a.0.cmp(&b.0));
        Ok((revision, all))
    }

    /// The whole prefix in one range request (one answer, at one revision); returns that
    /// revision.
    async fn read_whole_prefix(&self, mut each: impl FnMut(&etcd_client::KeyValue)) -> Result<i64> {
        let root = self.layout.root().as_bytes().to_vec();
        let answer = self
            .cluster
            .call("reading the prefix", Effect::Nothing, || {
                let mut kv = self.cluster.kv.clone();
                let options = GetOptions::new().with_range(prefix_end(&root));
                let root = root.clone();
                async move { kv.get(root, Some(options)).await }
            })
            .await?;
        for kv in answer.kvs() {
            each(kv);
        }
        Ok(answer.header().map_or(0, |h| h.revision()))
    }

    /// The last handle closed: give back unused auto keys, stop the committer, revoke the
    /// session (every lock key of this process goes with it) and stop the watch.
    pub async fn shutdown(&self) {
        self.closed.store(true, Ordering::SeqCst);
        for table in self.all_tables() {
            super::autokeys::give_back(self, &table).await;
        }
        self.commits.stop().await;
        self.session.close().await;
        self.replica.close();
    }
}

/// Paged reads of the prefix for a snapshot that a compaction may break before it is read in
/// one request (see [`Core::snapshot_all`]).
const PAGED_SNAPSHOT_TRIES: u32 = 3;

pub(crate) fn parse_counter(value: &[u8], table: &str) -> Result<u64> {
    std::str::from_utf8(value)
        .ok()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| Error::DatabaseCorrupt {
            path: table.to_string(),
            detail: format!(
                "the auto-key counter of map '{table}' is not a number: {:?}",
                String::from_utf8_lossy(value)
            ),
        })
}

/// Records the layout version under the prefix, or checks the one recorded; refuses a prefix
/// inside another store's (an ancestor's `meta/format` exists), in the same transaction.
/// Returns the revision it recorded the version at, or None when it was recorded already.
async fn check_format(cluster: &Cluster, layout: &Layout, url: &ClusterUrl) -> Result<Option<i64>> {
    let key = layout.format_key();
    let ancestors = layout.ancestor_format_keys();
    let mut compares = vec![Compare::create_revision(key.clone(), CompareOp::Equal, 0)];
    let mut reads = vec![TxnOp::get(key.clone(), None)];
    for (_, format) in &ancestors {
        compares.push(Compare::create_revision(
            format.clone(),
            CompareOp::Equal,
            0,
        ));
        reads.push(TxnOp::get(format.clone(), None));
    }
    let txn = Txn::new()
        .when(compares)
        .and_then([TxnOp::put(
            key.clone(),
            LAYOUT_VERSION,
            Some(PutOptions::new()),
        )])
        .or_else(reads);
    let answer = cluster
        .call("opening the store", Effect::Nothing, || {
            let mut kv = cluster.kv.clone();
            let txn = txn.clone();
            async move { kv.txn(txn).await }
        })
        .await?;
    if answer.succeeded() {
        return Ok(Some(answer.header().map_or(0, |h| h.revision())));
    }
    let found = txn_first_values(&answer);
    if let Some((outer, _)) = ancestors
        .iter()
        .zip(found.iter().skip(1))
        .find(|(_, value)| value.is_some())
        .map(|(a, _)| a)
    {
        return Err(nested_error(&url.prefix, outer));
    }
    match found.first().and_then(|v| v.as_deref()) {
        Some(v) if v == LAYOUT_VERSION.as_bytes() => Ok(None),
        other => Err(Error::DatabaseCorrupt {
            path: url.normalized(),
            detail: format!(
                "kvstore etcd layout {:?} is not supported (this build reads {LAYOUT_VERSION})",
                String::from_utf8_lossy(other.unwrap_or_default())
            ),
        }),
    }
}

/// A store at `inner` would mix its keys with the store at `outer`.
fn nested_error(inner: &str, outer: &str) -> Error {
    Error::invalid(format!(
        "the etcd prefix '{inner}' lies inside the prefix '{outer}' of another kvstore store: \
         their keys would mix; give each store a prefix that neither contains nor is contained \
         in another store's"
    ))
}

/// A refused open takes back the format record it made (only that one: nobody else's).
async fn forget_format(cluster: &Cluster, layout: &Layout, created: i64) {
    let key = layout.format_key();
    let txn = Txn::new()
        .when([Compare::create_revision(
            key.clone(),
            CompareOp::Equal,
            created,
        )])
        .and_then([TxnOp::delete(key, None)]);
    let _ = cluster
        .call("undoing the store's format record", Effect::Unknown, || {
            let mut kv = cluster.kv.clone();
            let txn = txn.clone();
            async move { kv.txn(txn).await }
        })
        .await;
}
