//! The session of one core: an etcd lease that every lock key of the process is attached to,
//! kept alive every TTL/3 by a task. A keep-alive answered with TTL ≤ 0, or no keep-alive
//! answered for a whole TTL (counted from when the last answered one was sent, so the lease
//! may already be gone on the server), ends the session: every lock taken under it is lost
//! (`holds` false, commits fail `LockLost`), the old lease is revoked (best effort, so its
//! lock keys go at once if it still lives) and a new lease is granted for later locks.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::error::{Error, Result};

use super::client::{unavailable, Cluster, Effect};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Lease {
    pub id: i64,
    /// TTL granted by the server, in seconds.
    pub ttl: i64,
}

pub(crate) struct Session {
    cluster: Cluster,
    /// TTL asked for, in whole seconds.
    ttl: i64,
    /// The live lease; `None` while the session is lost and no new lease is granted yet.
    current: watch::Sender<Option<Lease>>,
    /// Leases this core has held (lock keys of them, seen deleted, are this core's).
    known: Mutex<Vec<i64>>,
    /// Asks the keep-alive task to check the lease now (a lock key of it was seen deleted).
    check: tokio::sync::Notify,
    /// Test hook: no keep-alives are sent while set.
    paused: AtomicBool,
    closed: AtomicBool,
    /// Times the session was lost.
    losses: std::sync::atomic::AtomicU64,
}

impl Session {
    /// Grants the first lease; the caller starts [`Session::keep_alive`] on the runtime.
    pub async fn start(cluster: Cluster, ttl: Duration) -> Result<Arc<Session>> {
        let ttl = (ttl.as_millis().div_ceil(1000) as i64).max(1);
        let session = Arc::new(Session {
            cluster,
            ttl,
            current: watch::channel(None).0,
            known: Mutex::new(Vec::new()),
            check: tokio::sync::Notify::new(),
            paused: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            losses: Default::default(),
        });
        let lease = session.grant().await?;
        session.set(Some(lease));
        Ok(session)
    }

    async fn grant(&self) -> Result<Lease> {
        let ttl = self.ttl;
        let granted = self
            .cluster
            .call("granting the session lease", Effect::Nothing, || {
                let mut lease = self.cluster.lease.clone();
                async move { lease.grant(ttl, None).await }
            })
            .await?;
        self.known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(granted.id());
        Ok(Lease {
            id: granted.id(),
            ttl: granted.ttl().max(1),
        })
    }

    fn set(&self, lease: Option<Lease>) {
        self.current.send_replace(lease);
    }

    /// The live lease, if any.
    pub fn current(&self) -> Option<Lease> {
        *self.current.borrow()
    }

    /// Whether locks taken under `lease` still stand (as far as this process knows).
    pub fn is_live(&self, lease: i64) -> bool {
        self.current().is_some_and(|l| l.id == lease)
    }

    /// Whether `lease` is (or was) one of this core's.
    pub fn is_ours(&self, lease: i64) -> bool {
        self.known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&lease)
    }

    pub fn subscribe(&self) -> watch::Receiver<Option<Lease>> {
        self.current.subscribe()
    }

    pub fn losses(&self) -> u64 {
        self.losses.load(Ordering::Relaxed)
    }

    /// The live lease, waiting (up to the request timeout) for a new one after a loss.
    pub async fn live(&self) -> Result<Lease> {
        let mut rx = self.subscribe();
        let wait = async { rx.wait_for(|l| l.is_some()).await.map(|l| *l) };
        match tokio::time::timeout(self.cluster.timeout, wait).await {
            Ok(Ok(lease)) => Ok(lease.expect("waited for a lease")),
            Ok(Err(_)) => Err(Error::StoreClosed),
            Err(_) => Err(unavailable(
                "granting a new session lease",
                Effect::Nothing,
                &format!("no lease within {:?}", self.cluster.timeout),
            )),
        }
    }

    /// `lease` is known to be gone (etcd said "lease not found"): the session is lost.
    pub fn lost(&self, lease: i64) {
        if let Some(current) = self.current().filter(|l| l.id == lease) {
            self.lose(current);
        }
    }

    /// Has the keep-alive task send a keep-alive now: a lock key of this session was seen
    /// deleted, which a revoked or expired lease does.
    pub fn check_now(&self) {
        self.check.notify_one();
    }

    /// Test hook: stop (or resume) sending keep-alives, so the lease expires.
    pub fn pause(&self, paused: bool) {
        self.paused.store(paused, Ordering::SeqCst);
    }

    /// The session is lost: locks under `lease` are gone.
    fn lose(&self, lease: Lease) {
        if self.current() == Some(lease) {
            self.losses.fetch_add(1, Ordering::Relaxed);
            self.set(None);
            let cluster = self.cluster.clone();
            tokio::spawn(async move {
                let mut client = cluster.lease.clone();
                let _ = tokio::time::timeout(cluster.timeout, client.revoke(lease.id)).await;
            });
        }
    }

    /// Keeps the lease alive until [`Session::close`]; after a loss, grants a new one.
    pub async fn keep_alive(self: Arc<Session>) {
        while !self.closed.load(Ordering::SeqCst) {
            let lease = match self.current() {
                Some(lease) => lease,
                None => match self.grant().await {
                    Ok(lease) if !self.closed.load(Ordering::SeqCst) => {
                        self.set(Some(lease));
                        lease
                    }
                    Ok(_) => return,
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                },
            };
            self.keep(lease).await;
        }
    }

    /// Keeps `lease` alive until it is lost or the session closes.
    async fn keep(&self, lease: Lease) {
        let ttl = Duration::from_secs(lease.ttl as u64);
        let every = ttl / 3;
        // The lease lives at least until TTL after the last keep-alive that was answered was
        // sent (the grant, at first).
        let mut alive_until = Instant::now() + ttl;
        let mut changes = self.subscribe();
        'stream: while !self.closed.load(Ordering::SeqCst) {
            let mut client = self.cluster.lease.clone();
            let left = alive_until.saturating_duration_since(Instant::now());
            let opened = tokio::time::timeout(left, client.keep_alive(lease.id)).await;
            let (mut keeper, mut stream) = match opened {
                Ok(Ok(pair)) => pair,
                Ok(Err(_)) if Instant::now() < alive_until => {
                    tokio::time::sleep(Duration::from_millis(100).min(left)).await;
                    continue;
                }
                _ => break 'stream,
            };
            loop {
                if self.closed.load(Ordering::SeqCst) {
                    return;
                }
                if Instant::now() >= alive_until {
                    break 'stream;
                }
                if !self.paused.load(Ordering::SeqCst) {
                    let sent = Instant::now();
                    if keeper.keep_alive().await.is_err() {
                        continue 'stream;
                    }
                    let left = alive_until.saturating_duration_since(Instant::now());
                    let answer = tokio::select! {
                        answer = tokio::time::timeout(left, stream.message()) => answer,
                        // Lost meanwhile (see `lost`, e.g. the cluster was replaced): a new
                        // lease is granted at once instead of after this wait.
                        _ = changes.changed() => {
                            if self.current() != Some(lease) {
                                return;
                            }
                            continue;
                        }
                    };
                    match answer {
                        Ok(Ok(Some(answer))) if answer.ttl() <= 0 => break 'stream,
                        Ok(Ok(Some(_))) => alive_until = sent + ttl,
                        Ok(_) => continue 'stream,
                        Err(_) => break 'stream,
                    }
                }
                let next = (Instant::now() + every).min(alive_until);
                tokio::select! {
                    _ = tokio::time::sleep_until(next.into()) => {}
                    _ = self.check.notified() => {}
                    _ = changes.changed() => {}
                }
                if self.current() != Some(lease) {
                    // Lost meanwhile (see `lost`).
                    return;
                }
            }
        }
        if !self.closed.load(Ordering::SeqCst) {
            self.lose(lease);
        }
    }

    /// Stops the keep-alives and revokes the lease: every lock key of this core goes. The
    /// session is the last user of the core's connection: closing it closes the connection
    /// (the replica's watch ends with it), so that a closed store holds no socket even while
    /// a handle of it is still reachable.
    pub async fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        if let Some(lease) = self.current.send_replace(None) {
            let mut client = self.cluster.lease.clone();
            let _ = tokio::time::timeout(self.cluster.timeout, client.revoke(lease.id)).await;
        }
        self.cluster.close();
    }
}
