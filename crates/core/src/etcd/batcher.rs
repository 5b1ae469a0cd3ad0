//! Group requests for locks: the transactions that take or check a place in a key's lock
//! queue, from every key's driver, share etcd transactions the way commits do (each a nested
//! transaction of one outer one), so many keys locked at once cost a few round trips, not one
//! each. One batch is in flight at a time; what arrives meanwhile forms the next.

use etcd_client::{Txn, TxnOp, TxnOpResponse, TxnResponse};
use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, Result};

use super::client::{runtime, Cluster, Effect};

/// etcd's default `--max-txn-ops`; a nested transaction's operations count against what the
/// outer one leaves.
const MAX_TXN_OPS: usize = 128;

struct Job {
    txn: Txn,
    /// The most operations in one branch of `txn`.
    ops: usize,
    done: oneshot::Sender<Result<(i64, TxnResponse)>>,
}

pub(crate) struct TxnBatcher {
    tx: mpsc::UnboundedSender<Job>,
}

impl TxnBatcher {
    pub fn start(cluster: Cluster) -> TxnBatcher {
        let (tx, rx) = mpsc::unbounded_channel();
        runtime().spawn(run(cluster, rx));
        TxnBatcher { tx }
    }

    /// Runs `txn` (reads, and writes of keys no other job writes), alone or nested in a
    /// batch; returns the revision of the transaction it ran in and its own response. `ops`
    /// is the most operations in one of its branches.
    pub async fn run(&self, txn: Txn, ops: usize) -> Result<(i64, TxnResponse)> {
        let (done, answer) = oneshot::channel();
        self.tx
            .send(Job { txn, ops, done })
            .map_err(|_| Error::StoreClosed)?;
        answer.await.map_err(|_| Error::StoreClosed)?
    }
}

async fn run(cluster: Cluster, mut rx: mpsc::UnboundedReceiver<Job>) {
    while let Some(first) = rx.recv().await {
        let mut widest = first.ops;
        let mut batch = vec![first];
        let mut later = None;
        while let Ok(next) = rx.try_recv() {
            if batch.len() + 1 + widest.max(next.ops) > MAX_TXN_OPS {
                later = Some(next);
                break;
            }
            widest = widest.max(next.ops);
            batch.push(next);
        }
        write(&cluster, batch).await;
        if let Some(job) = later {
            write(&cluster, vec![job]).await;
        }
    }
}

async fn write(cluster: &Cluster, mut batch: Vec<Job>) {
    let what = "taking a place in a lock queue";
    if batch.len() == 1 {
        let job = batch.pop().expect("one job");
        let answer = cluster
            .call(what, Effect::Nothing, || {
                let mut kv = cluster.kv.clone();
                let txn = job.txn.clone();
                async move { kv.txn(txn).await }
            })
            .await
            .map(|answer| (answer.header().map_or(0, |h| h.revision()), answer));
        let _ = job.done.send(answer);
        return;
    }
    let txn = Txn::new().and_then(
        batch
            .iter()
            .map(|job| TxnOp::txn(job.txn.clone()))
            .collect::<Vec<_>>(),
    );
    let answer = cluster
        .call(what, Effect::Nothing, || {
            let mut kv = cluster.kv.clone();
            let txn = txn.clone();
            async move { kv.txn(txn).await }
        })
        .await;
    match answer {
        Ok(answer) => {
            let revision = answer.header().map_or(0, |h| h.revision());
            let nested = answer.op_responses().into_iter().map(|op| match op {
                TxnOpResponse::Txn(t) => Ok((revision, t)),
                _ => Err(Error::Unavailable {
                    message: format!("{what}: etcd answered a nested transaction oddly"),
                }),
            });
            for (job, answer) in batch.into_iter().zip(nested) {
                let _ = job.done.send(answer);
            }
        }
        Err(Error::InvalidArgument(_)) => {
            // The cluster's limits are tighter than the defaults: one at a time.
            for job in batch {
                Box::pin(write(cluster, vec![job])).await;
            }
        }
        Err(err) => {
            for job in batch {
                let _ = job.done.send(Err(err.clone()));
            }
        }
    }
}
