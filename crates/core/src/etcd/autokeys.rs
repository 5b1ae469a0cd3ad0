//! Auto keys across processes: each process leases blocks of numbers from the counter at
//! `P/meta/seq/<t>` with a compare-and-swap transaction (`If ModRevision == seen Then Put`),
//! retried on conflict, so no number is handed out twice anywhere; within a process they
//! increase. The table's key format is recorded with each lease. A clean close gives the
//! unused rest of the last lease back, only if nobody leased after it.

use std::sync::Arc;

use etcd_client::{Compare, CompareOp, Txn, TxnOp, TxnOpResponse};

use crate::error::{Error, Result};
use crate::keys::KeyFormat;
use crate::sequence::{NumberCallback, Take};
use crate::NextKey;

use super::client::{runtime, Effect};
use super::core::{parse_counter, Core, TableState};

/// The next auto key of `table` in format `keys`; see [`super::ClusterMap::next_key`].
pub(crate) fn next_key(
    core: &Arc<Core>,
    table: &Arc<TableState>,
    keys: KeyFormat,
    make_waiter: impl FnOnce() -> Box<dyn FnOnce(Result<String>) + Send>,
) -> Result<NextKey> {
    let keys = table.check_key_format(keys)?;
    let take = table.sequence().take(|| {
        let notify = make_waiter();
        let waiter: NumberCallback = Box::new(move |n| notify(n.and_then(|n| keys.format(n))));
        waiter
    });
    match take {
        Take::Number(n) => Ok(NextKey::Ready(keys.format(n)?)),
        Take::NeedLease(until) => {
            if let Some(until) = until {
                runtime().spawn(lease(core.clone(), table.clone(), until, keys));
            }
            Ok(NextKey::Pending)
        }
    }
}

/// Leases numbers until the sequence's waiters are served (`until` is what the sequence asks
/// for: its last lease's end plus the block).
async fn lease(core: Arc<Core>, table: Arc<TableState>, mut until: u64, keys: KeyFormat) {
    loop {
        let count = until.saturating_sub(table.lease().0).max(1);
        match lease_once(&core, &table, count, keys).await {
            Ok((start, end)) => {
                let (served, again) = table.sequence().leased_from(start, end);
                for (waiter, n) in served {
                    waiter(Ok(n));
                }
                match again {
                    Some(next) => until = next,
                    None => return,
                }
            }
            Err(err) => {
                let failed = table.sequence().lease_failed(&err);
                for (waiter, err) in failed {
                    waiter(Err(err));
                }
                return;
            }
        }
    }
}

/// Takes `[start, start + count)` from the cluster's counter.
async fn lease_once(
    core: &Core,
    table: &TableState,
    count: u64,
    keys: KeyFormat,
) -> Result<(u64, u64)> {
    let seq_key = core.layout.seq_key(&table.name);
    let keys_key = core.layout.keys_key(&table.name);
    let what = format!("leasing auto keys of map '{}'", table.name);
    // What this process last saw of the counter: (value, mod revision); (0, 0) if absent.
    let mut seen: Option<(u64, i64)> = None;
    for _ in 0..1000 {
        let (value, revision) = match seen {
            Some(s) => s,
            None => {
                let answer = core
                    .cluster
                    .call(&what, Effect::Nothing, || {
                        let mut kv = core.cluster.kv.clone();
                        let key = seq_key.clone();
                        async move { kv.get(key, None).await }
                    })
                    .await?;
                match answer.kvs().first() {
                    Some(kv) => (parse_counter(kv.value(), &table.name)?, kv.mod_revision()),
                    None => (0, 0),
                }
            }
        };
        let end = value
            .checked_add(count)
            .ok_or_else(|| Error::illegal_key("the auto-key counter is exhausted"))?;
        let txn = Txn::new()
            .when([Compare::mod_revision(
                seq_key.clone(),
                CompareOp::Equal,
                revision,
            )])
            .and_then([
                TxnOp::put(seq_key.clone(), end.to_string(), None),
                TxnOp::put(keys_key.clone(), keys.encode(), None),
            ])
            .or_else([TxnOp::get(seq_key.clone(), None)]);
        let answer = core
            .cluster
            .call(&what, Effect::Unknown, || {
                let mut kv = core.cluster.kv.clone();
                let txn = txn.clone();
                async move { kv.txn(txn).await }
            })
            .await?;
        if answer.succeeded() {
            let written = answer.header().map_or(0, |h| h.revision());
            *table.lease() = (end, written);
            return Ok((value, end));
        }
        // Another process leased meanwhile: start from what it wrote.
        let current = answer.op_responses().into_iter().find_map(|op| match op {
            TxnOpResponse::Get(get) => get.kvs().first().cloned(),
            _ => None,
        });
        seen = match current {
            Some(kv) => Some((parse_counter(kv.value(), &table.name)?, kv.mod_revision())),
            None => Some((0, 0)),
        };
    }
    Err(Error::Unavailable {
        message: format!("{what}: too many conflicting leases; nothing was leased"),
    })
}

/// At a clean close: writes the first number not handed out back to the counter, if this
/// process's lease is still the last one.
pub(crate) async fn give_back(core: &Core, table: &TableState) {
    let Some(next) = table.sequence().give_back() else {
        return;
    };
    let (_, written) = *table.lease();
    if written == 0 {
        return;
    }
    let seq_key = core.layout.seq_key(&table.name);
    let txn = Txn::new()
        .when([Compare::mod_revision(
            seq_key.clone(),
            CompareOp::Equal,
            written,
        )])
        .and_then([TxnOp::put(seq_key, next.to_string(), None)]);
    let _ = core
        .cluster
        .call("giving back auto keys", Effect::Unknown, || {
            let mut kv = core.cluster.kv.clone();
            let txn = txn.clone();
            async move { kv.txn(txn).await }
        })
        .await;
}
